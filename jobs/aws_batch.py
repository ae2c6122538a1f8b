"""The AWS Batch training runner: ``./spark-submit.sh train --runner aws-batch``.

Role: runs the training step in a container on AWS Batch instead of this process. The container is
the job definition ``training.aws_batch.job_definition`` (an image holding this repository after
``make setup``); this runner only overrides its command with the same ``train`` command the local
runner would run, reading from and writing to S3:

    ./spark-submit.sh train --runner local --input s3://... --output s3://... --model M --set ...

Inputs: ``--input`` as for ``train`` (snapshot folder, CSV folder or CSV file). A local input is
uploaded first to ``<S3 base>/inputs/<job name>/``; an ``s3://`` input is used where it is. The S3
base is ``training.workspace`` when that is ``s3://``, else ``training.aws_batch.staging``.
Outputs: the ``train`` output layout (``recommendations/``, ``embeddings.npy``, ``metadata.json``)
at ``--output``. An ``s3://`` output stays there; a local one (default
``<training.workspace>/models/<model version>``) is written by the job to
``<S3 base>/models/<job name>/`` and then downloaded.

Steps: upload, ``submit_job`` to ``training.aws_batch.job_queue`` (with a Batch attempt timeout of
``timeout_minutes``), poll ``describe_jobs`` every ``poll_seconds`` logging each status change,
terminate the job when it has not finished after ``timeout_minutes``, then check that the output's
``metadata.json`` (which ``train`` writes last) exists, and download. A FAILED job raises
:class:`BatchJobError` with Batch's status reason, the container's reason and exit code and the
CloudWatch log stream; nothing is downloaded then. The staged copies - an uploaded local input,
and a remote output once downloaded - are deleted afterwards, unless
``training.aws_batch.keep_staged``.

    ./spark-submit.sh train --runner aws-batch --input data/training/snapshots/<ts> [--output DIR]
    ./spark-submit.sh nightly --runner aws-batch
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError

from carousel import objectstore
from carousel.config import CarouselConfig

log = logging.getLogger(__name__)

SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
JOB_NAME_PREFIX = "carousel-train"
LOG_GROUP = "/aws/batch/job"  # where Batch sends the containers' output (awslogs driver default)
LOG_TAIL_LINES = 20
# Batch job names: up to 128 letters, digits, hyphens and underscores.
_JOB_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_JOB_NAME_MAX = 128
# A status line at least this often while a job sits in one status, so long runs show they are alive.
_HEARTBEAT_SECONDS = 300.0


class BatchJobError(RuntimeError):
    """The Batch job failed, timed out or left no complete output; the message names the job and why."""


def job_name(model_name: str, submitted_at: datetime) -> str:
    """``carousel-train-<model>-<UTC time>``: unique per run, readable in the Batch console."""
    stamp = submitted_at.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    model = _JOB_NAME_UNSAFE.sub("-", model_name).strip("-") or "model"
    return f"{JOB_NAME_PREFIX}-{model}-{stamp}"[:_JOB_NAME_MAX]


def training_overrides(cfg: CarouselConfig) -> list[str]:
    """``key=value`` settings that make the container train exactly as this process would.

    The image carries its own ``conf/``; the effective ``training.top_k`` and ``training.model.*``
    values (from any ``--config``, environment variable or ``--set`` given here) are forwarded so the
    model does not depend on which defaults the image was built with. The region and a non-default
    endpoint go too, so the container reaches the same S3.
    """
    training = cfg.training
    aws = training.aws_batch
    pairs = [f"training.top_k={training.top_k}"]
    pairs += [f"training.model.{key}={value}" for key, value in training.model.model_dump().items()]
    pairs.append(f"training.aws_batch.region={aws.region}")
    if aws.endpoint_url:
        pairs.append(f"training.aws_batch.endpoint_url={aws.endpoint_url}")
    # The staging client (objectstore.s3_client) prefers storage.s3: the container's must too.
    s3 = cfg.storage.s3
    pairs += [f"storage.s3.{key}={value}" for key, value in s3.model_dump().items() if value]
    return pairs


def container_command(
    input_uri: str, output_uri: str, model_name: str, overrides: Sequence[str] = ()
) -> list[str]:
    """The ``train`` command the container runs: the local runner, S3 in and S3 out."""
    command = ["./spark-submit.sh", "train", "--runner", "local", "--input", input_uri]
    command += ["--output", output_uri, "--model", model_name]
    for override in overrides:
        command += ["--set", override]
    return command


def build_submit_request(
    cfg: CarouselConfig,
    input_uri: str,
    output_uri: str,
    model_name: str,
    submitted_at: datetime,
) -> dict[str, Any]:
    """Keyword arguments of ``batch.submit_job`` for one training run (both locations on S3)."""
    for role, uri in (("input", input_uri), ("output", output_uri)):
        if not objectstore.is_s3(uri):
            raise ValueError(f"an AWS Batch job reads and writes S3 only; its {role} is {uri!r}")
    aws = cfg.training.aws_batch
    return {
        "jobName": job_name(model_name, submitted_at),
        "jobQueue": aws.job_queue,
        "jobDefinition": aws.job_definition,
        "containerOverrides": {
            "command": container_command(input_uri, output_uri, model_name, training_overrides(cfg)),
            "environment": [
                {"name": "AWS_REGION", "value": aws.region},
                {"name": "AWS_DEFAULT_REGION", "value": aws.region},
                # Log lines reach CloudWatch as they are written, not when the buffer fills.
                {"name": "PYTHONUNBUFFERED", "value": "1"},
            ],
        },
        # Batch kills a runaway attempt itself, even when this submitting process is gone.
        "timeout": {"attemptDurationSeconds": aws.timeout_minutes * 60},
    }


def submit_training_job(client: BaseClient, request: dict[str, Any]) -> str:
    """Submit the job described by ``request`` (see :func:`build_submit_request`); returns its id."""
    response = client.submit_job(**request)
    log.info(
        "submitted AWS Batch job %s (%s) to queue %s with definition %s",
        request["jobName"],
        response["jobId"],
        request["jobQueue"],
        request["jobDefinition"],
    )
    return response["jobId"]


def describe_job(client: BaseClient, job_id: str) -> dict[str, Any]:
    """Batch's description of one job."""
    jobs = client.describe_jobs(jobs=[job_id]).get("jobs", [])
    if not jobs:
        raise BatchJobError(f"AWS Batch job {job_id} not found")
    return jobs[0]


def log_stream(job: dict[str, Any]) -> str | None:
    """The CloudWatch log stream of the job's latest attempt (group ``/aws/batch/job``), if any."""
    stream = job.get("container", {}).get("logStreamName")
    for attempt in reversed(job.get("attempts", [])):
        stream = stream or attempt.get("container", {}).get("logStreamName")
    return stream


def failure_message(job: dict[str, Any], log_lines: Sequence[str] = ()) -> str:
    """Why a job FAILED: status reason, container reason, exit code, log stream and its last lines."""
    container = job.get("container", {})
    attempt = (job.get("attempts") or [{}])[-1].get("container", {})
    exit_code = container.get("exitCode", attempt.get("exitCode"))
    parts = [
        f"AWS Batch job {job.get('jobName')} ({job.get('jobId')}) {job.get('status')}",
        f"status reason: {job.get('statusReason') or 'none given'}",
        f"container reason: {container.get('reason') or attempt.get('reason') or 'none given'}",
        f"exit code: {'unknown' if exit_code is None else exit_code}",
    ]
    stream = log_stream(job)
    parts.append(f"logs: CloudWatch {LOG_GROUP} stream {stream}" if stream else "logs: no log stream")
    message = "; ".join(parts)
    if log_lines:
        message += "\nlast log lines:\n" + "\n".join(f"  {line}" for line in log_lines)
    return message


def log_tail(logs: BaseClient, stream: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` messages of a job's CloudWatch log stream; none when they cannot be read."""
    try:
        response = logs.get_log_events(
            logGroupName=LOG_GROUP, logStreamName=stream, limit=lines, startFromHead=False
        )
    except (ClientError, BotoCoreError) as err:  # no logs:GetLogEvents permission, stream gone...
        log.warning("cannot read CloudWatch log stream %s: %s", stream, err)
        return []
    return [event["message"] for event in response.get("events", [])][-lines:]


def wait_for_job(
    client: BaseClient,
    job_id: str,
    poll_seconds: float,
    timeout_seconds: float,
    logs: BaseClient | None = None,
) -> dict[str, Any]:
    """Poll until the job SUCCEEDED (returns its description) or FAILED (raises :class:`BatchJobError`).

    Each status change is logged with the seconds since waiting began. After ``timeout_seconds`` the
    job is terminated and :class:`BatchJobError` raised. With a CloudWatch ``logs`` client the error
    of a FAILED job ends with the last lines of its output.
    """
    started = time.monotonic()
    deadline = started + timeout_seconds
    status, since, last_line = None, started, started
    while True:
        job = describe_job(client, job_id)
        now = time.monotonic()
        if job["status"] != status:
            log.info(
                "AWS Batch job %s: %s%s after %.0fs",
                job["jobName"],
                job["status"],
                f" (was {status} for {now - since:.0f}s)" if status else "",
                now - started,
            )
            status, since, last_line = job["status"], now, now
        elif now - last_line >= _HEARTBEAT_SECONDS:
            log.info("AWS Batch job %s: still %s after %.0fs", job["jobName"], status, now - since)
            last_line = now
        if status == SUCCEEDED:
            return job
        if status == FAILED:
            stream = log_stream(job)
            tail = log_tail(logs, stream) if logs is not None and stream else []
            raise BatchJobError(failure_message(job, tail))
        if now >= deadline:
            reason = f"carousel: no result after {timeout_seconds:.0f}s (training.aws_batch.timeout_minutes)"
            client.terminate_job(jobId=job_id, reason=reason)
            log.error("terminated AWS Batch job %s (%s): %s", job["jobName"], job_id, reason)
            raise BatchJobError(
                f"AWS Batch job {job['jobName']} ({job_id}) was still {status} after "
                f"{timeout_seconds:.0f}s; terminated it"
            )
        time.sleep(min(poll_seconds, max(deadline - now, 0.0)))


def s3_base(cfg: CarouselConfig) -> str:
    """Where a Batch run stages local inputs and outputs: an S3 workspace, else ``aws_batch.staging``."""
    workspace = cfg.training.workspace
    if objectstore.is_s3(workspace):
        return workspace
    staging = cfg.training.aws_batch.staging
    if not staging:
        raise ValueError(
            f"training.aws_batch.staging is empty and training.workspace is local ({workspace}): an AWS "
            "Batch job needs an S3 prefix for its input and output; set training.aws_batch.staging="
            "s3://bucket/prefix (or an s3:// workspace, or s3:// --input and --output)"
        )
    return staging


def stage_input(input_location: str, target_uri: str, s3: BaseClient) -> str:
    """Upload a local file or folder to ``target_uri``; returns the S3 location the job reads."""
    source = objectstore.local_path(input_location)
    if source.is_file():
        bucket, key = objectstore.split_s3(target_uri)
        s3.upload_file(str(source), bucket, f"{key}/{source.name}" if key else source.name)
        names = [source.name]
    elif source.is_dir():
        names = objectstore.upload_dir(source, target_uri, client=s3)
    else:
        raise FileNotFoundError(f"training input {input_location} does not exist")
    log.info("uploaded %d input files from %s to %s", len(names), input_location, target_uri)
    return target_uri


def read_output_metadata(output_uri: str, job: dict[str, Any], s3: BaseClient) -> dict[str, Any]:
    """The ``metadata.json`` of a SUCCEEDED job's output; :class:`BatchJobError` when it is missing."""
    location = objectstore.join(output_uri, "metadata.json")
    try:
        return json.loads(objectstore.read_text(location, client=s3))
    except FileNotFoundError:
        stream = log_stream(job)
        raise BatchJobError(
            f"AWS Batch job {job.get('jobName')} ({job.get('jobId')}) SUCCEEDED but {location} does not "
            "exist: the output is incomplete (train writes metadata.json last)"
            + (f"; logs: CloudWatch {LOG_GROUP} stream {stream}" if stream else "")
        ) from None


def fetch_output(output_uri: str, target: Path, s3: BaseClient) -> int:
    """Download a model output to the local folder ``target``, which appears whole or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        names = objectstore.download_dir(output_uri, partial, client=s3)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("downloaded %d output files from %s to %s", len(names), output_uri, target)
    return len(names)


def _check_local_target(output: str) -> None:
    path = objectstore.local_path(output)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"output folder {path} already exists and is not empty")


def run(
    cfg: CarouselConfig, input_location: str, output: str | None = None, model_name: str | None = None
) -> dict[str, Any]:
    """Upload, submit, wait, verify, download; returns the output's metadata with ``output`` added.

    ``model_name`` defaults to the configured ``training.model.name``. Also in the result:
    ``batch_job_id``, ``batch_job_name`` and ``remote_output`` (the S3 output).
    """
    model_name = model_name or cfg.training.model.name
    workspace = cfg.training.workspace
    submitted_at = datetime.now(UTC)
    name = job_name(model_name, submitted_at)
    s3 = objectstore.s3_client(cfg)
    local_output = not objectstore.is_s3(output) if output else not objectstore.is_s3(workspace)
    if output and local_output:
        _check_local_target(output)  # before paying for a Batch run

    input_uri = input_location
    aws = cfg.training.aws_batch
    if not objectstore.is_s3(input_location):
        input_uri = stage_input(input_location, objectstore.join(s3_base(cfg), "inputs", name), s3)
    try:
        return _submit_and_fetch(cfg, s3, name, model_name, input_uri, output, local_output, submitted_at)
    finally:
        if input_uri != input_location and not aws.keep_staged:
            removed = objectstore.delete_prefix(input_uri, client=s3)
            log.info("deleted the %d staged input files under %s", removed, input_uri)


def _submit_and_fetch(
    cfg: CarouselConfig,
    s3: BaseClient,
    name: str,
    model_name: str,
    input_uri: str,
    output: str | None,
    local_output: bool,
    submitted_at: datetime,
) -> dict[str, Any]:
    workspace = cfg.training.workspace
    if output and not local_output:
        remote_output = output
    else:
        remote_output = objectstore.join(s3_base(cfg), "models", name)

    request = build_submit_request(cfg, input_uri, remote_output, model_name, submitted_at)
    batch = objectstore.batch_client(cfg)
    job_id = submit_training_job(batch, request)
    aws = cfg.training.aws_batch
    logs = objectstore.aws_client(cfg, "logs")
    job = wait_for_job(batch, job_id, aws.poll_seconds, aws.timeout_minutes * 60, logs)
    metadata = read_output_metadata(remote_output, job, s3)

    result_output = remote_output
    if local_output:
        target = output or objectstore.join(workspace, "models", str(metadata["model_version"]))
        if not output:
            _check_local_target(target)
        fetch_output(remote_output, objectstore.local_path(target), s3)
        result_output = target
        if not aws.keep_staged:  # the S3 copy was only the way home
            objectstore.delete_prefix(remote_output, client=s3)
    log.info(
        "AWS Batch job %s trained %s: %s rows at %s",
        name,
        metadata.get("model_version"),
        metadata.get("rows"),
        result_output,
    )
    return {
        **metadata,
        "output": result_output,
        "remote_output": remote_output,
        "batch_job_id": job_id,
        "batch_job_name": name,
    }
