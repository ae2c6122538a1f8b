"""AWS Batch on loopback for tests: moto's Batch engine (server mode) and a stand-in compute worker.

How a job runs here, with nothing patched:

* The Batch API is the moto server of ``s3_fixture.s3_endpoint`` (one server answers every service).
  Its Batch backend runs each submitted job in a thread that walks it SUBMITTED -> PENDING ->
  RUNNABLE -> STARTING -> RUNNING and then drives the job's container through the Docker SDK
  (``docker.from_env()``, so ``DOCKER_HOST``): create, start, poll until it exits, fetch its logs
  into CloudWatch (``/aws/batch/job``), wait for the exit code, remove. The job stays RUNNING for
  as long as the container runs, and ends SUCCEEDED on exit code 0, FAILED otherwise or when
  ``terminate_job`` kills it.
* There is no Docker here, so :class:`StandInWorker` is the compute worker: a minimal Docker
  Engine HTTP API on 127.0.0.1 (``DOCKER_HOST=tcp://...``) that *executes the container's command
  itself*, as a subprocess in the project root (the image's working directory) with the container's
  environment on top of this process's. The job's command is the real one from the job
  (``./spark-submit.sh train --runner local --input s3://... --output s3://...``), so the training
  really runs and really writes to the loopback S3 while moto reports the job RUNNING.

Why not moto's Docker-less Batch (``/moto-api/config`` ``{"batch": {"use_docker": false}}``): its
``submit_job`` marks every job SUCCEEDED (or, with ``MOTO_SIMPLE_BATCH_FAIL_AFTER``, FAILED) before
it returns, so nothing could run the command while the job is RUNNING, and the state manager has
no effect on it (getmoto/moto#8287). The state manager's ``batch::job`` transitions
(``/moto-api/state-manager/set-transition``) only pace the steps *before* RUNNING; the fixture uses
a ``time`` progression so that every status is visible to a poller for a moment. The fixture sets
``use_docker`` to true explicitly, through ``/moto-api/config``, since that setting is process-wide.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit
from urllib.request import Request, urlopen

import boto3
import pytest
from s3_fixture import S3_TEST_REGION

from carousel.config import PROJECT_ROOT

# The Docker Engine API version the stand-in speaks (the Docker SDK negotiates it via /version).
_API_VERSION = "1.45"
_VERSIONED = re.compile(r"^/v\d+\.\d+")
# Seconds each pre-RUNNING status lasts (moto state manager, ``time`` progression).
STATUS_STEP_SECONDS = 0.3
KILLED_EXIT_CODE = 137


@dataclass
class Container:
    """One container the stand-in runs: the job's command, environment, output and exit code."""

    id: str
    name: str
    image: str
    command: list[str]
    env: dict[str, str]
    logs: list[str] = field(default_factory=list)
    exit_code: int | None = None
    started: bool = False
    process: subprocess.Popen | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def state(self) -> str:
        if self.exit_code is not None:
            return "exited"
        return "running" if self.started else "created"

    def inspect(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "Name": f"/{self.name}",
            "Image": self.image,
            "State": {
                "Status": self.state,
                "Running": self.state == "running",
                "ExitCode": self.exit_code or 0,
            },
            # Tty makes the Docker SDK read the logs as plain text rather than multiplexed frames.
            "Config": {"Tty": True, "Cmd": self.command, "Image": self.image},
            "NetworkSettings": {"Networks": {}, "IPAddress": "127.0.0.1"},
        }


class StandInWorker:
    """A loopback Docker Engine API whose containers are subprocesses running the job's command."""

    def __init__(self) -> None:
        self.containers: dict[str, Container] = {}
        self.executed: list[list[str]] = []  # every command started, in order
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def docker_host(self) -> str:
        host, port = self._server.server_address[:2]
        return f"tcp://{host}:{port}"

    def __enter__(self) -> StandInWorker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for container in list(self.containers.values()):
            self.kill(container.id)
        self._server.shutdown()
        self._server.server_close()

    def create(self, name: str, spec: dict[str, Any]) -> Container:
        env = dict(item.split("=", 1) for item in spec.get("Env") or [])
        container = Container(
            id=uuid.uuid4().hex,
            name=name or uuid.uuid4().hex[:12],
            image=spec.get("Image", ""),
            command=list(spec.get("Cmd") or []),
            env=env,
        )
        with self._lock:
            self.containers[container.id] = container
        return container

    def start(self, container: Container) -> None:
        with self._lock:
            if container.started:
                return
            container.started = True
            self.executed.append(container.command)
        try:
            container.process = subprocess.Popen(
                container.command,
                cwd=PROJECT_ROOT,
                env={**os.environ, **container.env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        except OSError as err:  # the command does not exist: Docker reports exit code 127
            container.logs.append(f"{_stamp()} cannot run {container.command!r}: {err}")
            container.exit_code = 127
            container.done.set()
            return
        threading.Thread(target=self._collect, args=(container,), daemon=True).start()

    def _collect(self, container: Container) -> None:
        assert container.process is not None and container.process.stdout is not None
        for line in container.process.stdout:
            container.logs.append(f"{_stamp()} {line.rstrip()}")
        code = container.process.wait()
        container.exit_code = KILLED_EXIT_CODE if code < 0 else code
        container.done.set()

    def kill(self, container_id: str) -> None:
        container = self.containers.get(container_id)
        if container is None:
            return
        if container.process is not None and container.process.poll() is None:
            container.process.kill()
            container.done.wait(30)
        elif container.exit_code is None:
            container.exit_code = KILLED_EXIT_CODE
            container.done.set()

    def logs_of(self, command_prefix: list[str]) -> list[str]:
        """Output lines of the containers whose command starts with ``command_prefix``."""
        return [
            line
            for c in self.containers.values()
            if c.command[: len(command_prefix)] == command_prefix
            for line in c.logs
        ]


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _handler_for(worker: StandInWorker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the test output quiet
            return

        def _reply(self, status: int, body: Any = None, raw: bytes | None = None) -> None:
            data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if raw is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> tuple[list[str], dict[str, list[str]]]:
            url = urlsplit(self.path)
            return _VERSIONED.sub("", url.path).strip("/").split("/"), parse_qs(url.query)

        def _container(self, container_id: str) -> Container | None:
            container = worker.containers.get(container_id)
            if container is None:
                self._reply(404, {"message": f"No such container: {container_id}"})
            return container

        def do_GET(self) -> None:
            parts, query = self._route()
            if parts == ["version"]:
                self._reply(200, {"ApiVersion": _API_VERSION, "MinAPIVersion": "1.24", "Version": "stand-in"})
            elif parts == ["_ping"]:
                self._reply(200, raw=b"OK")
            elif len(parts) == 3 and parts[0] == "containers" and parts[2] == "json":
                if container := self._container(parts[1]):
                    self._reply(200, container.inspect())
            elif len(parts) == 3 and parts[0] == "containers" and parts[2] == "logs":
                if container := self._container(parts[1]):
                    # All output is reported as stdout (the subprocess merges stderr into it).
                    wanted = query.get("stdout", ["0"])[0] in ("1", "true", "True")
                    text = "".join(f"{line}\n" for line in container.logs) if wanted else ""
                    self._reply(200, raw=text.encode())
            else:
                self._reply(404, {"message": f"not supported by the stand-in worker: GET {self.path}"})

        def do_POST(self) -> None:
            parts, query = self._route()
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            if parts == ["containers", "create"]:
                container = worker.create(query.get("name", [""])[0], body)
                self._reply(201, {"Id": container.id, "Warnings": []})
            elif len(parts) == 3 and parts[0] == "containers" and parts[2] in ("start", "wait", "kill"):
                if container := self._container(parts[1]):
                    if parts[2] == "start":
                        worker.start(container)
                        self._reply(204)
                    elif parts[2] == "kill":
                        worker.kill(container.id)
                        self._reply(204)
                    else:
                        container.done.wait()
                        self._reply(200, {"StatusCode": container.exit_code, "Error": None})
            else:
                self._reply(404, {"message": f"not supported by the stand-in worker: POST {self.path}"})

        def do_DELETE(self) -> None:
            parts, _ = self._route()
            if len(parts) == 2 and parts[0] == "containers":
                if self._container(parts[1]):
                    self._reply(204)
            else:
                self._reply(404, {"message": f"not supported by the stand-in worker: DELETE {self.path}"})

    return Handler


def _moto_api(endpoint: str, path: str, payload: dict[str, Any]) -> None:
    request = Request(
        f"{endpoint}/moto-api/{path}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urlopen(request, timeout=10) as response:
        assert response.status in (200, 201), f"moto-api/{path}: HTTP {response.status}"


@dataclass(frozen=True)
class BatchEnvironment:
    endpoint: str
    job_queue: str
    job_definition: str
    worker: StandInWorker


@pytest.fixture(scope="module")
def batch_env(s3_endpoint: str) -> Iterator[BatchEnvironment]:
    """A job queue and job definition on the loopback moto server, run by a :class:`StandInWorker`."""
    with StandInWorker() as worker, pytest.MonkeyPatch.context() as env:
        # moto's job threads build their Docker client from the environment, when the job starts.
        env.setenv("DOCKER_HOST", worker.docker_host)
        env.delenv("DOCKER_TLS_VERIFY", raising=False)
        env.delenv("DOCKER_CONTEXT", raising=False)
        _moto_api(s3_endpoint, "config", {"batch": {"use_docker": True}})
        _moto_api(
            s3_endpoint,
            "state-manager/set-transition",
            {
                "model_name": "batch::job",
                "transition": {"progression": "time", "seconds": STATUS_STEP_SECONDS},
            },
        )
        suffix = uuid.uuid4().hex[:8]
        iam = boto3.client("iam", region_name=S3_TEST_REGION, endpoint_url=s3_endpoint)
        role = iam.create_role(
            RoleName=f"carousel-batch-{suffix}",
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": "batch.amazonaws.com"},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
        )["Role"]["Arn"]
        batch = boto3.client("batch", region_name=S3_TEST_REGION, endpoint_url=s3_endpoint)
        compute = batch.create_compute_environment(
            computeEnvironmentName=f"carousel-test-{suffix}", type="UNMANAGED", serviceRole=role
        )["computeEnvironmentArn"]
        queue = batch.create_job_queue(
            jobQueueName=f"carousel-training-{suffix}",
            state="ENABLED",
            priority=1,
            computeEnvironmentOrder=[{"order": 1, "computeEnvironment": compute}],
        )["jobQueueName"]
        definition = batch.register_job_definition(
            jobDefinitionName=f"carousel-train-{suffix}",
            type="container",
            containerProperties={
                "image": "carousel:test",
                "command": ["./spark-submit.sh", "--help"],
                "resourceRequirements": [
                    {"type": "VCPU", "value": "1"},
                    {"type": "MEMORY", "value": "2048"},
                ],
            },
        )["jobDefinitionName"]
        try:
            yield BatchEnvironment(s3_endpoint, queue, definition, worker)
        finally:
            _moto_api(s3_endpoint, "state-manager/unset-transition", {"model_name": "batch::job"})
