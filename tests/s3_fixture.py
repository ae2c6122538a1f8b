"""A real S3-compatible server on loopback for tests: moto in server mode, nothing patched.

Import the fixtures explicitly in a test module (``from s3_fixture import s3_bucket, s3_endpoint``).
``s3_endpoint`` starts one server per test session on a free port and sets dummy AWS credentials in
the environment for as long as it runs (boto3's standard chain then finds them); ``s3_bucket``
creates a fresh bucket on it per test.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

S3_TEST_REGION = "us-east-1"
# Dummy credentials the test server accepts, and no shared config or credentials files, so that
# nothing ever reaches a real account. The Spark JVM and its Python workers read the environment
# once, when they start: conftest's spark fixture sets these before it starts them.
TEST_AWS_ENVIRONMENT: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "carousel-test-key",
    "AWS_SECRET_ACCESS_KEY": "carousel-test-secret",
    "AWS_DEFAULT_REGION": S3_TEST_REGION,
    "AWS_CONFIG_FILE": "/nonexistent/carousel-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/carousel-test-aws-credentials",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_test_aws_environment(env: pytest.MonkeyPatch) -> None:
    """:data:`TEST_AWS_ENVIRONMENT` in the environment, without session tokens or profiles."""
    for name, value in TEST_AWS_ENVIRONMENT.items():
        env.setenv(name, value)
    env.delenv("AWS_SESSION_TOKEN", raising=False)
    env.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server on 127.0.0.1, for the whole test session."""
    with pytest.MonkeyPatch.context() as env:
        set_test_aws_environment(env)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the test server."""
    name = f"carousel-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", region_name=S3_TEST_REGION, endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
