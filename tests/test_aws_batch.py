"""The AWS Batch training runner (``train --runner aws-batch``), against Batch and S3 on loopback.

Unit tests check the pure parts: the ``submit_job`` request (name, queue, definition, the ``train``
command with the forwarded settings, environment, timeout), the S3 staging rules and the failure
message. The integration tests use moto's real Batch engine in server mode, whose jobs are run by
the stand-in compute worker of ``batch_fixture`` (a loopback Docker Engine API that executes the
job's actual container command as a subprocess; see that module for why moto's Docker-less mode
cannot be used): the job stays RUNNING while ``./spark-submit.sh train --runner local --input
s3://... --output s3://...`` really trains and writes to the loopback S3, and its exit code decides
SUCCEEDED or FAILED. Nothing is patched.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pandas as pd
import pytest
from batch_fixture import KILLED_EXIT_CODE, BatchEnvironment, batch_env  # noqa: F401 - fixture
from s3_fixture import S3_TEST_REGION, s3_bucket, s3_endpoint  # noqa: F401 - fixtures
from support import wait_for

from carousel import objectstore
from carousel.config import ConfigError, load_config
from carousel.schemas import RECOMMENDATION_COLUMNS
from jobs import aws_batch, train
from jobs import simulate_events as sim

END = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
STATUS_ORDER = ["SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED", "FAILED"]
# Small and fast: a 40-item world and a one-epoch 8-dimensional model.
SMALL_TRAINING = [
    "training.top_k=5",
    "training.model.embedding_dim=8",
    "training.model.epochs=1",
    "training.model.batch_size=512",
    "training.model.min_item_count=1",
    "simulator.users=150",
    "simulator.items=40",
    "simulator.days=5",
]


def _settings(tmp_path: Path, env: BatchEnvironment, bucket: str) -> list[str]:
    return [
        f"training.workspace={tmp_path}/training",
        f"training.aws_batch.endpoint_url={env.endpoint}",
        f"training.aws_batch.region={S3_TEST_REGION}",
        f"training.aws_batch.job_queue={env.job_queue}",
        f"training.aws_batch.job_definition={env.job_definition}",
        "training.aws_batch.poll_seconds=0.2",
        f"training.aws_batch.staging=s3://{bucket}/staging",
        *SMALL_TRAINING,
    ]


def _interactions_csv(tmp_path: Path, n_events: int = 3000) -> Path:
    cfg = load_config(overrides=SMALL_TRAINING)
    rows = sim.interaction_rows(sim.build_world(cfg.simulator), cfg.simulator, n_events, END, seed=5)
    lines = [
        "user_id,item_id,event_type,event_time",
        *(",".join(v) for v in zip(*rows.values(), strict=True)),
    ]
    path = tmp_path / "clicks.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _batch(env: BatchEnvironment):
    return boto3.client("batch", region_name=S3_TEST_REGION, endpoint_url=env.endpoint)


def _status(env: BatchEnvironment, job_id: str) -> dict:
    return _batch(env).describe_jobs(jobs=[job_id])["jobs"][0]


# --- unit: the request and the rules -------------------------------------------------------------


def test_submit_request_runs_the_local_train_command_with_the_effective_settings():
    cfg = load_config(
        overrides=[
            "training.top_k=7",
            "training.model.epochs=3",
            "training.model.learning_rate=0.00001",
            "training.aws_batch.job_queue=q-train",
            "training.aws_batch.job_definition=def-train:4",
            "training.aws_batch.timeout_minutes=90",
            "training.aws_batch.region=eu-west-1",
        ]
    )
    request = aws_batch.build_submit_request(
        cfg, "s3://b/in/run", "s3://b/models/run", "item2vec", datetime(2026, 11, 29, 4, 5, 6, tzinfo=UTC)
    )
    assert request["jobName"] == "carousel-train-item2vec-20261129T040506Z"
    assert (request["jobQueue"], request["jobDefinition"]) == ("q-train", "def-train:4")
    assert request["timeout"] == {"attemptDurationSeconds": 90 * 60}
    command = request["containerOverrides"]["command"]
    assert command[:10] == ["./spark-submit.sh", "train", "--runner", "local", "--input", "s3://b/in/run",
                            "--output", "s3://b/models/run", "--model", "item2vec"]  # fmt: skip
    overrides = command[11::2]
    assert command[10::2] == ["--set"] * len(overrides)
    assert "training.aws_batch.region=eu-west-1" in overrides
    assert not any(o.startswith("training.aws_batch.endpoint_url") for o in overrides)  # AWS itself
    # The container, with its own defaults, ends up with exactly this process's training settings.
    remote = load_config(overrides=overrides).training
    assert (remote.top_k, remote.model) == (7, cfg.training.model)
    env = {e["name"]: e["value"] for e in request["containerOverrides"]["environment"]}
    assert env == {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1", "PYTHONUNBUFFERED": "1"}

    with_endpoint = load_config(overrides=["training.aws_batch.endpoint_url=http://127.0.0.1:9"])
    assert "training.aws_batch.endpoint_url=http://127.0.0.1:9" in aws_batch.training_overrides(with_endpoint)
    with pytest.raises(ValueError, match="its input is '/data/in'"):
        aws_batch.build_submit_request(cfg, "/data/in", "s3://b/out", "item2vec", END)


def test_job_names_are_batch_safe():
    assert (
        aws_batch.job_name("llr cooccurrence/v2", END)
        == "carousel-train-llr-cooccurrence-v2-20261129T120000Z"
    )
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,128}", aws_batch.job_name("x" * 300, END))


def test_staging_rules(tmp_path):
    local = load_config(overrides=[f"training.workspace={tmp_path}"])
    with pytest.raises(ValueError, match="training.aws_batch.staging is empty"):
        aws_batch.s3_base(local)
    staged = load_config(
        overrides=[f"training.workspace={tmp_path}", "training.aws_batch.staging=s3://b/stage"]
    )
    assert aws_batch.s3_base(staged) == "s3://b/stage"
    s3_workspace = load_config(
        overrides=["training.workspace=s3://w/ws", "training.aws_batch.staging=s3://b/x"]
    )
    assert aws_batch.s3_base(s3_workspace) == "s3://w/ws"
    with pytest.raises(ConfigError, match="training.aws_batch.staging"):
        load_config(overrides=["training.aws_batch.staging=/tmp/not-s3"])

    # Through the CLI: a local input with nowhere to stage it stops before anything is submitted.
    csv = tmp_path / "in.csv"
    csv.write_text("user_id,item_id,event_type,event_time\n")
    assert (
        train.main(["--runner", "aws-batch", "--input", str(csv), "--set", f"training.workspace={tmp_path}"])
        == 1
    )


def test_failure_message_names_reason_exit_code_and_log_stream():
    description = {
        "jobName": "carousel-train-item2vec-20261129T030000Z",
        "jobId": "0f5c",
        "status": "FAILED",
        "statusReason": "Essential container in task exited",
        "container": {"reason": "OutOfMemoryError: Container killed due to memory usage", "exitCode": 137,
                      "logStreamName": "carousel-train/default/abc"},
    }  # fmt: skip
    message = aws_batch.failure_message(description)
    for part in (
        "carousel-train-item2vec-20261129T030000Z (0f5c) FAILED",
        "Essential container in task exited",
        "OutOfMemoryError",
        "exit code: 137",
        "stream carousel-train/default/abc",
    ):
        assert part in message
    with_logs = aws_batch.failure_message(description, ["Traceback ...", "MemoryError"])
    assert with_logs.endswith("last log lines:\n  Traceback ...\n  MemoryError")
    bare = aws_batch.failure_message({"jobName": "j", "jobId": "i", "status": "FAILED"})
    assert "status reason: none given" in bare and "exit code: unknown" in bare and "no log stream" in bare


# --- integration: moto Batch + the stand-in worker + loopback S3 ------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_train_on_aws_batch_runs_the_job_command_and_fetches_the_output(
    tmp_path,
    batch_env,  # noqa: F811
    s3_bucket,  # noqa: F811
    caplog,
):
    csv = _interactions_csv(tmp_path)
    output = tmp_path / "model"
    caplog.set_level(logging.INFO, logger="jobs.aws_batch")
    flags = [arg for setting in _settings(tmp_path, batch_env, s3_bucket) for arg in ("--set", setting)]

    assert train.main(["--runner", "aws-batch", "--input", str(csv), "--output", str(output), *flags]) == 0

    metadata = json.loads((output / "metadata.json").read_text())
    recommendations = pd.read_csv(output / "recommendations" / "part-00000.csv")
    assert list(recommendations.columns) == list(RECOMMENDATION_COLUMNS)
    assert metadata["top_k"] == 5 and metadata["params"]["epochs"] == 1  # forwarded settings were used
    assert len(recommendations) == metadata["rows"] == 5 * len(metadata["items"]) > 0
    assert (output / "embeddings.npy").is_file()
    assert not list(tmp_path.glob(".model.*"))  # the download appeared whole, nothing left behind

    submitted = [r.args for r in caplog.records if r.msg.startswith("submitted AWS Batch job")]
    assert len(submitted) == 1
    name, job_id = submitted[0][:2]
    job = _status(batch_env, job_id)
    assert job["status"] == "SUCCEEDED"
    # The worker ran exactly the job's command: the local runner on the staged input, S3 to S3.
    command = job["container"]["command"]
    assert command in batch_env.worker.executed
    staged_input = f"s3://{s3_bucket}/staging/inputs/{name}"
    assert command[4:8] == ["--input", staged_input, "--output", f"s3://{s3_bucket}/staging/models/{name}"]
    assert metadata["input"] == staged_input
    s3 = objectstore.s3_client(load_config(overrides=_settings(tmp_path, batch_env, s3_bucket)))
    # The staged copies are gone once the model is home (training.aws_batch.keep_staged: false).
    assert objectstore.list_files(staged_input, client=s3) == []
    assert objectstore.list_files(f"s3://{s3_bucket}/staging/models/{name}", client=s3) == []
    # Progress: every status change was logged, in Batch's order, ending RUNNING -> SUCCEEDED.
    seen = [r.args[1] for r in caplog.records if r.msg.startswith("AWS Batch job %s: %s%s")]
    assert seen[-2:] == ["RUNNING", "SUCCEEDED"]
    assert seen == sorted(seen, key=STATUS_ORDER.index) and len(seen) >= 3


@pytest.mark.integration
@pytest.mark.slow
def test_a_failed_job_raises_its_reason_and_log_stream_and_leaves_no_output(
    tmp_path,
    batch_env,  # noqa: F811
    s3_bucket,  # noqa: F811
):
    cfg = load_config(overrides=_settings(tmp_path, batch_env, s3_bucket))
    no_csv = tmp_path / "snapshot"
    no_csv.mkdir()
    (no_csv / "README.txt").write_text("no interactions in here\n")
    output = tmp_path / "model"

    with pytest.raises(aws_batch.BatchJobError) as caught:
        aws_batch.run(cfg, str(no_csv), str(output))

    message = str(caught.value)
    assert re.search(r"AWS Batch job carousel-train-next_item2vec-\d{8}T\d{6}Z \(\S+\) FAILED", message)
    assert not output.exists()
    stream = re.search(r"CloudWatch /aws/batch/job stream (\S+)", message)
    assert stream, message
    logs = boto3.client("logs", region_name=S3_TEST_REGION, endpoint_url=batch_env.endpoint)
    events = logs.get_log_events(logGroupName="/aws/batch/job", logStreamName=stream.group(1))["events"]
    assert any("no interaction CSV files" in e["message"] for e in events), events[-5:]
    # ... and the error itself ends with the last lines of that log: the reason, where it is read.
    assert "last log lines:" in message and "training failed: no interaction CSV files" in message
    s3 = objectstore.s3_client(cfg)
    assert objectstore.list_files(f"s3://{s3_bucket}/staging/models", client=s3) == []


@pytest.mark.integration
def test_a_job_that_runs_too_long_is_terminated(tmp_path, batch_env, s3_bucket):  # noqa: F811
    cfg = load_config(overrides=_settings(tmp_path, batch_env, s3_bucket))
    request = aws_batch.build_submit_request(
        cfg, f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", "item2vec", datetime.now(UTC)
    )
    request["containerOverrides"]["command"] = ["sleep", "300"]  # a container that outlives the wait
    batch = objectstore.batch_client(cfg)
    job_id = aws_batch.submit_training_job(batch, request)
    wait_for(lambda: _status(batch_env, job_id)["status"] == "RUNNING", 30, "the job to be RUNNING", poll=0.2)

    with pytest.raises(aws_batch.BatchJobError, match=r"was still RUNNING after 1s; terminated it"):
        aws_batch.wait_for_job(batch, job_id, poll_seconds=0.2, timeout_seconds=1)

    wait_for(lambda: _status(batch_env, job_id)["status"] == "FAILED", 30, "the terminated job to fail")
    assert "no result after 1s" in _status(batch_env, job_id)["statusReason"]
    killed = [c for c in batch_env.worker.containers.values() if c.command == ["sleep", "300"]]
    assert [c.exit_code for c in killed] == [KILLED_EXIT_CODE]


@pytest.mark.integration
def test_a_succeeded_job_without_metadata_is_an_error(tmp_path, batch_env, s3_bucket):  # noqa: F811
    cfg = load_config(overrides=_settings(tmp_path, batch_env, s3_bucket))
    output = f"s3://{s3_bucket}/models/never-written"
    request = aws_batch.build_submit_request(
        cfg, f"s3://{s3_bucket}/in", output, "item2vec", datetime.now(UTC)
    )
    request["containerOverrides"]["command"] = ["true"]  # exits 0 without writing anything
    batch = objectstore.batch_client(cfg)
    job = aws_batch.wait_for_job(batch, aws_batch.submit_training_job(batch, request), 0.2, 60)
    assert job["status"] == "SUCCEEDED"

    with pytest.raises(
        aws_batch.BatchJobError, match=r"SUCCEEDED but .*never-written/metadata.json does not exist"
    ):
        aws_batch.read_output_metadata(output, job, objectstore.s3_client(cfg))
