"""carousel.objectstore against local folders and a real S3-compatible server (moto, loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3_fixture import s3_bucket, s3_endpoint  # noqa: F401  (fixtures used by name)

from carousel import objectstore
from carousel.config import CarouselConfig, load_config


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def _make_tree(root: Path) -> dict[str, str]:
    files = {"a.txt": "alpha", "sub/b.csv": "x,y\n1,2\n", "sub/deeper/c.json": '{"k": "ü"}'}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return files


@pytest.fixture
def s3_cfg(s3_endpoint: str) -> CarouselConfig:  # noqa: F811
    return load_config(overrides=[f"training.aws_batch.endpoint_url={s3_endpoint}"])


def test_uri_helpers():
    assert objectstore.is_s3("s3://b/k") and objectstore.is_s3("s3a://b/k")
    assert not objectstore.is_s3("/tmp/x") and not objectstore.is_s3("file:///tmp/x")
    assert objectstore.split_s3("s3://bucket/a/b/") == ("bucket", "a/b")
    assert objectstore.split_s3("s3://bucket") == ("bucket", "")
    assert objectstore.join("s3://b/p/", "/x/", "y.json") == "s3://b/p/x/y.json"
    assert objectstore.join("/tmp/w", "snap", "") == "/tmp/w/snap"
    assert objectstore.local_path("file:///tmp/x") == Path("/tmp/x")
    assert objectstore.local_path("file:/tmp/x") == Path("/tmp/x")  # Hadoop's own spelling
    with pytest.raises(ValueError, match="not a local path"):
        objectstore.local_path("s3a://b/x")
    with pytest.raises(ValueError):
        objectstore.split_s3("/tmp/x")
    with pytest.raises(ValueError):
        objectstore.split_s3("s3:///key")


def test_s3_client_uses_configured_region_and_endpoint(s3_cfg: CarouselConfig, s3_endpoint: str):  # noqa: F811
    client = objectstore.s3_client(s3_cfg)
    assert client.meta.region_name == s3_cfg.training.aws_batch.region
    assert client.meta.endpoint_url == s3_endpoint


def test_local_paths_round_trip(tmp_path: Path):
    files = _make_tree(tmp_path / "src")
    assert objectstore.upload_dir(tmp_path / "src", str(tmp_path / "dst")) == sorted(files)
    assert _tree(tmp_path / "dst") == files
    assert objectstore.download_dir(f"file://{tmp_path}/dst", tmp_path / "back") == sorted(files)
    assert _tree(tmp_path / "back") == files

    target = objectstore.join(str(tmp_path), "out", "manifest.json")
    assert not objectstore.exists(target)
    objectstore.write_text(target, "first")
    objectstore.write_text(target, "second ✓")
    assert objectstore.read_text(target) == "second ✓"
    assert objectstore.exists(target) and objectstore.exists(str(tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["manifest.json"]  # no temp files left
    with pytest.raises(FileNotFoundError):
        objectstore.read_text(str(tmp_path / "missing.txt"))


def test_s3_round_trip(tmp_path: Path, s3_cfg: CarouselConfig, s3_bucket: str):  # noqa: F811
    client = objectstore.s3_client(s3_cfg)
    files = _make_tree(tmp_path / "src")
    prefix = f"s3://{s3_bucket}/work/snap-1"

    assert not objectstore.exists(prefix, client=client)
    assert objectstore.upload_dir(tmp_path / "src", prefix, client=client) == sorted(files)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == [f"work/snap-1/{name}" for name in sorted(files)]
    assert objectstore.list_files(prefix, client=client) == sorted(files)
    assert objectstore.exists(prefix, client=client)
    assert objectstore.exists(objectstore.join(prefix, "sub", "b.csv"), client=client)
    assert not objectstore.exists(objectstore.join(prefix, "sub", "nope.csv"), client=client)
    # A prefix that merely starts like another one is not a folder.
    assert not objectstore.exists(f"s3://{s3_bucket}/work/snap", client=client)

    assert objectstore.download_dir(prefix, tmp_path / "back", client=client) == sorted(files)
    assert _tree(tmp_path / "back") == files

    manifest = objectstore.join(prefix, "manifest.json")
    objectstore.write_text(manifest, '{"rows": 3, "name": "ü"}', client=client)
    assert objectstore.read_text(manifest, client=client) == '{"rows": 3, "name": "ü"}'
    with pytest.raises(FileNotFoundError):
        objectstore.read_text(objectstore.join(prefix, "missing.json"), client=client)


def test_s3_keys_that_climb_out_of_the_target_are_refused(
    tmp_path: Path,
    s3_cfg: CarouselConfig,  # noqa: F811
    s3_bucket: str,  # noqa: F811
):
    client = objectstore.s3_client(s3_cfg)
    prefix = f"s3://{s3_bucket}/work/snap-evil"
    client.put_object(Bucket=s3_bucket, Key="work/snap-evil/ok.csv", Body=b"a")
    client.put_object(Bucket=s3_bucket, Key="work/snap-evil/../../escaped.csv", Body=b"b")
    target = tmp_path / "inside" / "back"
    with pytest.raises(ValueError, match=r"'\.\./\.\./escaped\.csv' would be written outside"):
        objectstore.download_dir(prefix, target, client=client)
    assert not (tmp_path / "escaped.csv").exists() and not (tmp_path / "inside" / "escaped.csv").exists()
    assert not target.exists(), "nothing may be downloaded when one key is refused"


def test_s3_default_client_comes_from_the_standard_chain(
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811
    s3_bucket: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    """Without a client, boto3's own environment settings are used (no config needed)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    uri = f"s3://{s3_bucket}/plain.txt"
    objectstore.write_text(uri, "hello")
    assert objectstore.read_text(uri) == "hello"
    assert objectstore.list_files(f"s3://{s3_bucket}") == ["plain.txt"]
