"""Files on a local disk or in S3, through one small set of functions.

Role: training snapshots, validation reports and model outputs live under
``training.workspace``, which is a local folder or ``s3://bucket/prefix``. Jobs write locally and
use these helpers to publish (``upload_dir``, ``write_text``) and fetch (``download_dir``,
``read_text``) without caring which of the two it is. Local paths (and ``file://`` URIs) are
handled with plain file copies; ``s3://`` (and ``s3a://``, the Hadoop spelling of the same
objects) go through boto3.

Credentials come only from boto3's standard chain (environment, shared config, instance or task
role); nothing here reads, logs or stores them. :func:`s3_client` takes the region and an optional
S3-compatible endpoint (MinIO, a loopback test server) from ``storage.s3`` (else
``training.aws_batch``); :func:`batch_client` and :func:`aws_client` (AWS Batch, CloudWatch Logs)
for the ``aws-batch`` runner take them from ``training.aws_batch``.

Every S3 function takes an optional ``client``; without one a client is built from the standard
chain and environment alone (``AWS_REGION``, ``AWS_ENDPOINT_URL``), so callers with a
configuration should pass ``client=s3_client(cfg)``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

from carousel.config import CarouselConfig, local_disk_path

log = logging.getLogger(__name__)

S3_SCHEMES: tuple[str, ...] = ("s3://", "s3a://")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names S3 objects (``s3://`` or ``s3a://``) rather than a local path."""
    return uri.startswith(S3_SCHEMES)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key has no leading or trailing slash."""
    if not is_s3(uri):
        raise ValueError(f"not an S3 URI: {uri!r}")
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI without a bucket: {uri!r}")
    return bucket, key.strip("/")


def local_path(uri: str) -> Path:
    """The local path behind a plain path or a ``file:`` URI (the rule of
    :func:`carousel.config.local_disk_path`, which the launcher and ``stop`` use too)."""
    if is_s3(uri):
        raise ValueError(f"not a local path: {uri!r}")
    return local_disk_path(uri)


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended, ``/``-separated (for local paths too); no doubled slashes."""
    pieces = [uri.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


def s3_client(cfg: CarouselConfig | None = None) -> BaseClient:
    """A boto3 S3 client: the S3 service of ``storage.s3`` (the one Spark and delta-rs use), else
    the region and endpoint of ``training.aws_batch``; credentials from boto3's chain.

    No endpoint means AWS itself. With an explicit endpoint (S3-compatible servers), or with
    ``storage.s3.path_style_access``, path-style addressing is used, which those servers expect.
    """
    kwargs: dict[str, Any] = {}
    if cfg is not None:
        aws, s3 = cfg.training.aws_batch, cfg.storage.s3
        kwargs["region_name"] = s3.region or aws.region
        endpoint = s3.endpoint_url or aws.endpoint_url
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        # storage.s3 says its addressing; an endpoint of training.aws_batch alone means path style.
        path_style = s3.path_style_access if s3.endpoint_url else bool(endpoint) or s3.path_style_access
        if path_style:
            kwargs["config"] = Config(s3={"addressing_style": "path"}, retries={"mode": "standard"})
    return boto3.client("s3", **kwargs)


def aws_client(cfg: CarouselConfig, service: str) -> BaseClient:
    """A boto3 client of ``service`` with ``training.aws_batch``'s region and endpoint (AWS Batch,
    CloudWatch Logs); credentials from boto3's chain."""
    aws = cfg.training.aws_batch
    kwargs: dict[str, Any] = {"region_name": aws.region, "config": Config(retries={"mode": "standard"})}
    if aws.endpoint_url:
        kwargs["endpoint_url"] = aws.endpoint_url
    return boto3.client(service, **kwargs)


def batch_client(cfg: CarouselConfig) -> BaseClient:
    """The AWS Batch client of ``training.aws_batch`` (the training runner ``aws-batch``)."""
    return aws_client(cfg, "batch")


def _client(client: BaseClient | None) -> BaseClient:
    return client if client is not None else s3_client()


def _is_not_found(err: ClientError) -> bool:
    return str(err.response.get("Error", {}).get("Code")) in _NOT_FOUND


def list_files(uri: str, *, client: BaseClient | None = None) -> list[str]:
    """Relative ``/``-separated names of every file under ``uri`` (a folder or prefix), sorted."""
    if not is_s3(uri):
        root = local_path(uri)
        if not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(uri)
    prefix = f"{key}/" if key else ""
    names: list[str] = []
    for page in _client(client).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if name and not name.endswith("/"):  # skip "folder" marker objects
                names.append(name)
    return sorted(names)


def delete_prefix(uri: str, *, client: BaseClient | None = None) -> int:
    """Delete every file under ``uri`` (a folder or prefix); returns how many were deleted."""
    names = list_files(uri, client=client)
    if not is_s3(uri):
        shutil.rmtree(local_path(uri), ignore_errors=True)
        return len(names)
    bucket, key = split_s3(uri)
    prefix = f"{key}/" if key else ""
    s3 = _client(client)
    for start in range(0, len(names), 1000):  # delete_objects takes at most 1,000 keys
        chunk = [{"Key": prefix + name} for name in names[start : start + 1000]]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
    return len(names)


def _copy_files(source: Path, target: Path, names: list[str]) -> None:
    """Copy the files ``names`` (relative paths) from folder ``source`` to folder ``target``."""
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target / name)


def upload_dir(local_dir: str | Path, uri: str, *, client: BaseClient | None = None) -> list[str]:
    """Copy every file under ``local_dir`` to ``uri`` (S3 prefix or local folder); return the names.

    Files keep their relative paths. Each S3 object appears atomically, but the folder as a whole
    does not: publish a marker (a manifest) last when readers need the set to be complete.
    """
    source = Path(local_dir)
    names = list_files(str(source))
    if not is_s3(uri):
        _copy_files(source, local_path(uri), names)
        return names
    bucket, key = split_s3(uri)
    s3 = _client(client)
    for name in names:
        s3.upload_file(str(source / name), bucket, f"{key}/{name}" if key else name)
    log.debug("uploaded %d files from %s to %s", len(names), source, uri)
    return names


def download_dir(uri: str, local_dir: str | Path, *, client: BaseClient | None = None) -> list[str]:
    """Copy every file under ``uri`` (S3 prefix or local folder) into ``local_dir``; return the names."""
    target = Path(local_dir)
    names = list_files(uri, client=client)
    # An object key may hold "../" (S3 keys are plain strings): such a file would land outside
    # local_dir, so the whole download is refused before anything is written.
    inside = target.resolve()
    for name in names:
        if not (inside / name).resolve().is_relative_to(inside):
            raise ValueError(f"{uri}: object {name!r} would be written outside {target}; nothing downloaded")
    if not is_s3(uri):
        _copy_files(local_path(uri), target, names)
        return names
    bucket, key = split_s3(uri)
    s3 = _client(client)
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"{key}/{name}" if key else name, str(target / name))
    log.debug("downloaded %d files from %s to %s", len(names), uri, target)
    return names


def write_text(uri: str, text: str, *, client: BaseClient | None = None) -> None:
    """Write ``text`` (UTF-8) to ``uri``, atomically: readers see the old content or the new, whole.

    Locally the text goes to a temporary file in the same folder, renamed into place; an S3 PUT is
    atomic by itself.
    """
    data = text.encode("utf-8")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not key:
            raise ValueError(f"S3 URI without an object key: {uri!r}")
        _client(client).put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_text(uri: str, *, client: BaseClient | None = None) -> str:
    """The UTF-8 text at ``uri``; :class:`FileNotFoundError` when there is none."""
    if not is_s3(uri):
        return local_path(uri).read_text(encoding="utf-8")
    bucket, key = split_s3(uri)
    try:
        body = _client(client).get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as err:
        if _is_not_found(err):
            raise FileNotFoundError(uri) from None
        raise
    with body:
        return body.read().decode("utf-8")


def exists(uri: str, *, client: BaseClient | None = None) -> bool:
    """Whether ``uri`` is a file, or a folder / prefix holding at least one object."""
    if not is_s3(uri):
        return local_path(uri).exists()
    bucket, key = split_s3(uri)
    s3 = _client(client)
    if key:
        try:
            s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as err:
            if not _is_not_found(err):
                raise
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
    return bool(listing.get("KeyCount", 0))
