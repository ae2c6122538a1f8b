"""Snapshot guards: the export's floor against the previous snapshot, and the manifest check
that ``train`` runs before it reads a snapshot.

The events table is the one of ``test_export_training_data`` (its helpers are imported): a 2-day
range ending at ``END`` holds 5 interactions, the range ending 2 days earlier (widened to the
6-day cap) only 2, below the default floor (0.5 x 5 -> at least 3). The manifest tests tamper with
copies of one real exported snapshot.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from pyspark.sql import SparkSession
from s3_fixture import s3_bucket, s3_endpoint  # noqa: F401  (fixtures used by name)
from test_export_training_data import _INTERACTIONS, _NOT_INTERACTIONS, DAY, END, _config

from carousel import objectstore
from carousel.config import ConfigError, load_config
from carousel.schemas import EVENTS_SCHEMA, EVENTS_TABLE
from jobs import export_training_data as export
from jobs import nightly, train
from jobs.export_training_data import (
    MANIFEST_FORMAT,
    SnapshotCorruptError,
    SnapshotTooSmallError,
    floor_rows,
    previous_snapshot,
    verify_snapshot,
)

QUIET_END = END - 2 * DAY  # the range before it holds 2 interactions (see the module docstring)


@pytest.fixture(scope="module")
def events_root(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export tests' events table, in a folder of this module (the jobs only read it)."""
    root = tmp_path_factory.mktemp("guards")
    (
        spark.createDataFrame(_INTERACTIONS + _NOT_INTERACTIONS, EVENTS_SCHEMA)
        .write.format("delta")
        .partitionBy("event_date")
        .save(_config(root).storage.table(EVENTS_TABLE))
    )
    return root


@pytest.fixture(scope="module")
def snapshot(spark: SparkSession, events_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real snapshot (5 rows), exported once; tests tamper with copies of it."""
    output = tmp_path_factory.mktemp("snapshot") / "snap"
    export.run(spark, _config(events_root), output=str(output), end=END)
    return output


@pytest.fixture
def copy(snapshot: Path, tmp_path: Path) -> Path:
    target = tmp_path / "snap"
    shutil.copytree(snapshot, target)
    return target


def _data_files(folder: Path) -> list[Path]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [folder / "interactions" / f["name"] for f in manifest["data"]["files"]]


# ---------------------------------------------------------------------------------------------
# The floor
# ---------------------------------------------------------------------------------------------
def test_floor_rows_rounds_away_float_noise():
    assert floor_rows(5, 0.5) == 3  # 2.5 interactions are not enough: 3 are
    assert floor_rows(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert floor_rows(1000, 1) == 1000
    assert floor_rows(1000, 0) == 0


def test_snapshot_floor_is_configurable_within_0_and_1():
    assert load_config().training.snapshot_floor == 0.5
    assert load_config(overrides=["training.snapshot_floor=0"]).training.snapshot_floor == 0
    with pytest.raises(ConfigError, match="snapshot_floor"):
        load_config(overrides=["training.snapshot_floor=1.5"])


def _write_manifest(folder: Path, **fields) -> None:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT, **fields}))


def test_previous_snapshot_is_the_newest_readable_manifest(tmp_path: Path, caplog):
    root = tmp_path / "snapshots"
    _write_manifest(root / "z-old", rows=10, created_at="2026-01-01T00:00:00Z")
    _write_manifest(root / "a-new", rows=20, created_at="2026-02-01T00:00:00Z")  # newest: not by name
    _write_manifest(root / "being-written", rows=99, created_at="2026-03-01T00:00:00Z")
    _write_manifest(root / "no-rows", created_at="2026-04-01T00:00:00Z")
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{not json")
    (root / "incomplete" / "interactions").mkdir(parents=True)  # no manifest: never counted

    with caplog.at_level(logging.WARNING, logger="jobs.export_training_data"):
        found = previous_snapshot(str(root), exclude=f"{root}/being-written/")
    assert (found.location, found.rows) == (f"{root}/a-new", 20)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"{root}/broken/manifest.json" in warned and f"{root}/no-rows/manifest.json" in warned
    assert previous_snapshot(str(tmp_path / "nothing-here")) is None


def test_export_far_below_the_previous_snapshot_is_refused_unless_allowed(
    spark: SparkSession, events_root: Path, tmp_path: Path
):
    cfg = _config(events_root, f"training.workspace={tmp_path}/workspace")
    snapshots = f"{cfg.training.workspace}/snapshots"
    first = export.run(spark, cfg, output=f"{snapshots}/first", end=END)
    assert first["rows"] == 5 and first["previous"] is None

    # 2 interactions after 5: below the floor (at least 3). No manifest, no data left behind.
    with pytest.raises(SnapshotTooSmallError) as caught:
        export.run(spark, cfg, output=f"{snapshots}/quiet", end=QUIET_END)
    message = str(caught.value)
    for part in ("holds 2 interactions", "the 5 of the previous snapshot", f"{snapshots}/first"):
        assert part in message
    assert "snapshot_floor=0.5" in message and "at least 3" in message and "--allow-smaller" in message
    quiet = Path(snapshots, "quiet")
    assert not (quiet / "manifest.json").exists() and not (quiet / "interactions").exists()

    # nightly reports it as its export step failing (and trains nothing).
    with pytest.raises(nightly.StepFailedError, match="export/validate: .*snapshot_floor=0.5"):
        nightly.run(spark, cfg, end=QUIET_END)

    # The override publishes it (same folder: the refused data is gone) and says so in the manifest.
    allowed = export.run(spark, cfg, output=f"{snapshots}/quiet", end=QUIET_END, allow_smaller=True)
    manifest = json.loads((quiet / "manifest.json").read_text())
    assert allowed["rows"] == manifest["rows"] == 2
    assert manifest["previous"] == {
        "location": f"{snapshots}/first",
        "rows": 5,
        "floor": 0.5,
        "allowed_smaller": True,
    }
    assert verify_snapshot(quiet) == manifest


def test_refused_export_to_s3_uploads_no_data(
    spark: SparkSession,
    events_root: Path,
    s3_endpoint: str,  # noqa: F811
    s3_bucket: str,  # noqa: F811
):
    cfg = _config(
        events_root,
        f"training.workspace=s3://{s3_bucket}/carousel",
        f"training.aws_batch.endpoint_url={s3_endpoint}",
    )
    first = export.run(spark, cfg, end=END)
    output = f"s3://{s3_bucket}/carousel/snapshots/quiet"
    with pytest.raises(SnapshotTooSmallError, match=first["output"]):
        export.run(spark, cfg, output=output, end=QUIET_END)
    names = objectstore.list_files(output, client=objectstore.s3_client(cfg))
    assert names and all(n.startswith("quality/") for n in names)  # the report only


# ---------------------------------------------------------------------------------------------
# Verification against the manifest
# ---------------------------------------------------------------------------------------------
def test_verify_passes_on_a_fresh_snapshot_and_skips_plain_csv(snapshot: Path, caplog):
    with caplog.at_level(logging.INFO, logger="jobs.export_training_data"):
        manifest = verify_snapshot(snapshot)
    assert manifest == json.loads((snapshot / "manifest.json").read_text())
    assert f"snapshot {snapshot} verified: {len(manifest['data']['files'])} files" in caplog.text
    assert verify_snapshot(snapshot / "interactions") is None  # no manifest there: plain CSV input


def _change_one_byte(folder: Path) -> str:
    path = _data_files(folder)[0]
    data = bytearray(path.read_bytes())
    data[-2] = ord("0") if data[-2] != ord("0") else ord("1")  # same size, other bytes
    path.write_bytes(bytes(data))
    return f"interactions/{path.name}: sha256 mismatch"


def _append_a_row(folder: Path) -> str:
    path = _data_files(folder)[0]
    size = path.stat().st_size
    with path.open("a") as out:
        out.write("u9,i9,Product Viewed,2026-02-28T00:00:00.000000Z\n")
    return f"interactions/{path.name}: size {path.stat().st_size} != {size} bytes"


def _delete_a_file(folder: Path) -> str:
    path = _data_files(folder)[0]
    path.unlink()
    return f"interactions/{path.name}: missing"


def _add_a_csv(folder: Path) -> str:
    (folder / "interactions" / "part-99999-extra.csv").write_text("user_id,item_id,event_type,event_time\n")
    return "interactions/part-99999-extra.csv: unexpected file"


def _change_the_checksum(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["checksum"]["value"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return f"!= {'0' * 64} in the manifest"


@pytest.mark.parametrize(
    "tamper", [_change_one_byte, _append_a_row, _delete_a_file, _add_a_csv, _change_the_checksum]
)
def test_verify_names_the_file_and_the_reason(copy: Path, tamper):
    expected = tamper(copy)
    with pytest.raises(SnapshotCorruptError) as caught:
        verify_snapshot(copy)
    assert f"snapshot {copy} does not match its manifest.json: " in str(caught.value)
    assert expected in str(caught.value)


def test_verify_ignores_hidden_sidecars_and_refuses_paths_outside(copy: Path):
    (copy / "interactions" / "_SUCCESS").write_text("")
    (copy / "interactions" / ".part-00000.csv.crc").write_bytes(b"crc")
    assert verify_snapshot(copy) is not None
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["data"]["path"] = "../elsewhere/"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotCorruptError, match="outside its data folder"):
        verify_snapshot(copy)


# ---------------------------------------------------------------------------------------------
# train verifies before it reads
# ---------------------------------------------------------------------------------------------
def test_train_reads_a_verified_snapshot_and_refuses_a_tampered_one(
    copy: Path, events_root: Path, tmp_path: Path
):
    cfg = _config(events_root, f"training.workspace={tmp_path}/workspace")
    assert len(train.read_training_input(str(copy), cfg)) == 5

    file_reason = _change_one_byte(copy)
    for location in (copy, copy / "interactions"):  # the snapshot, or its data folder
        with pytest.raises(SnapshotCorruptError, match=file_reason):
            train.read_training_input(str(location), cfg)
        with pytest.raises(SnapshotCorruptError, match=file_reason):
            train.read_training_input_with_spark(str(location), cfg)
    # train.run stops before fitting; nothing is written.
    with pytest.raises(ValueError, match=file_reason):
        train.run(cfg, str(copy), output=str(tmp_path / "model"))
    assert not (tmp_path / "model").exists()


def test_train_verifies_the_downloaded_copy_of_an_s3_snapshot(
    copy: Path,
    events_root: Path,
    s3_endpoint: str,  # noqa: F811
    s3_bucket: str,  # noqa: F811
):
    cfg = _config(events_root, f"training.aws_batch.endpoint_url={s3_endpoint}")
    _add_a_csv(copy)
    location = f"s3://{s3_bucket}/snapshots/snap"
    objectstore.upload_dir(copy, location, client=objectstore.s3_client(cfg))
    with pytest.raises(SnapshotCorruptError) as caught:
        train.read_training_input(location, cfg)
    assert f"snapshot {location} does not match" in str(caught.value)
    assert "interactions/part-99999-extra.csv: unexpected file" in str(caught.value)
