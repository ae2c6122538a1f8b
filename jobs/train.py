"""Train an item-to-item model and write the product correlation matrix (top-k per item).

Role: the training step of the nightly pipeline, also usable on its own with any interaction CSV.
Inputs (``--input``): a training snapshot from ``export-training-data`` (its ``interactions/*.csv``),
a folder of CSV files, or one CSV file with the header ``user_id,item_id,event_type,event_time``
(ISO-8601 times); local or ``s3://``. Outputs (``--output``, local or ``s3://``, default
``<training.workspace>/models/<model version>``):

* ``recommendations/part-00000.csv`` - header ``item_id,rank,rec_item_id,score``, rank 1 = best;
* ``embeddings.npy`` + the ``items`` list in the metadata (models that learn embeddings), and for
  ``next_item2vec`` ``output_embeddings.npy`` and ``token_counts.npy``: with them ``update-model``
  warm-starts from this output once it is live (``jobs/update_model.py``);
* ``holdout/part-00000.csv`` - the newest ``training.gate.holdout_hours`` of the input, held back
  from fitting so that ``publish-recommendations`` can judge the model on unseen interactions
  (:func:`split_holdout`; absent when nothing could be held back);
* ``metadata.json`` - model version, top_k, items (the vocabulary), hyperparameters, counts,
  timings, input location, ``data_end`` (the newest interaction fitted on) and ``holdout``.

Runners: ``local`` (default, this process), ``spark`` (the input is read by Spark, so any
Hadoop-visible path works, e.g. ``s3a://`` or ``hdfs://`` on a cluster; the model trains on the
driver) and ``aws-batch`` (a container on AWS Batch runs the local runner on S3 copies of the input
and output; see ``jobs/aws_batch.py``). The model and its hyperparameters come from
``training.model`` in ``conf/``; training is seeded and reproducible.

A snapshot input (a folder with ``manifest.json``, or that folder's ``interactions/``) is checked
against its manifest before it is read (each file's size and sha256, no unlisted file, the checksum;
an ``s3://`` one after the download): a mismatch fails the run with
:class:`~jobs.export_training_data.SnapshotCorruptError` naming the file. The ``spark`` runner
checks local folders only (``s3a://``, ``hdfs://`` inputs are read unchecked).

    ./spark-submit.sh train --input data/training/snapshots/<ts> [--output DIR] [--model next_item2vec]
    ./spark-submit.sh train --runner spark --input s3a://bucket/snapshots/<ts>/interactions
    ./spark-submit.sh train --runner aws-batch --input data/training/snapshots/<ts>
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carousel import objectstore
from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig
from carousel.errors import spark_reason
from carousel.schemas import INTERACTION_COLUMNS, INTERACTION_SCHEMA, RECOMMENDATION_COLUMNS
from jobs import aws_batch
from jobs.export_training_data import DATA_DIR, MANIFEST_NAME, verify_snapshot

log = logging.getLogger(__name__)

RUNNERS = ("local", "spark", "aws-batch")
# The interactions held back from fitting (split_holdout), for publish's quality gate.
HOLDOUT_DIR = "holdout"
# A model's tables saved as <name>.npy when it has them (attribute name -> dtype): the input
# vectors (every embedding model), and next_item2vec's output vectors and token counts, which
# update-model's warm start needs.
TABLE_FILES: dict[str, type] = {
    "embeddings": np.float32,
    "output_embeddings": np.float32,
    "token_counts": np.float64,
}


def _csv_files(local: Path) -> list[Path]:
    if local.is_file():
        return [local]
    for folder in (local / "interactions", local):
        files = sorted(folder.glob("*.csv"))
        if files:
            return files
    raise FileNotFoundError(f"no interaction CSV files in {local} (nor in {local / 'interactions'})")


def _verify_snapshot_input(local: Path, location: str) -> None:
    """Check the snapshot behind the local folder ``local`` (``location`` as given) against its
    manifest: the folder itself, or its parent when it is a snapshot's data folder. A folder
    without a manifest is plain CSV input: nothing to check."""
    if (local / MANIFEST_NAME).is_file():
        verify_snapshot(local, label=location)
    elif local.name == DATA_DIR and (local.parent / MANIFEST_NAME).is_file():
        verify_snapshot(local.parent, label=str(local.parent))


def read_training_input(location: str, cfg: CarouselConfig) -> pd.DataFrame:
    """All interactions at ``location`` (file, folder or snapshot; local or S3) as one frame.

    A snapshot is verified against its manifest first (:class:`SnapshotCorruptError` on a mismatch).
    """
    from models.interactions import read_interactions

    local = Path(location)
    if objectstore.is_s3(location):
        local = Path(tempfile.mkdtemp(prefix="carousel-train-input-"))
        objectstore.download_dir(location, str(local), client=objectstore.s3_client(cfg))
    if local.is_dir():
        _verify_snapshot_input(local, location)
    frames = [read_interactions(path) for path in _csv_files(local)]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    log.info("read %d interactions from %s (%d files)", len(frame), location, len(frames))
    return frame


def read_training_input_with_spark(location: str, cfg: CarouselConfig) -> pd.DataFrame:
    """The same, read by Spark (any Hadoop file system) and collected to the driver via Arrow.

    A local snapshot folder is verified against its manifest first; other file systems are not.
    """
    from carousel.session import build_session

    if "://" in location and not location.startswith("file://"):  # s3a://, hdfs://, ...
        log.info("%s: not a local folder, the snapshot manifest check is skipped (spark runner)", location)
    elif objectstore.local_path(location).is_dir():
        _verify_snapshot_input(objectstore.local_path(location), location)

    spark = build_session(
        cfg, "carousel-train", extra_conf={"spark.sql.execution.arrow.pyspark.enabled": "true"}
    )
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    try:
        # FAILFAST: a row with the wrong number of fields or an unparseable time fails the read;
        # enforceSchema off: the header must name the columns, in order, not just count them.
        df = (
            spark.read.option("header", True)
            .option("mode", "FAILFAST")
            .option("enforceSchema", False)
            .schema(INTERACTION_SCHEMA)
            .csv(location)
        )
        with warnings.catch_warnings():
            # PySpark warns with the JVM's cause chain when an Arrow collect fails: said below, once.
            warnings.filterwarnings("ignore", message="toPandas attempted Arrow", category=UserWarning)
            frame = df.toPandas()
    except (PySparkException, Py4JJavaError) as err:
        raise ValueError(f"cannot read the interactions CSV at {location}: {spark_reason(err)}") from None
    for column in frame.columns:
        missing = int(frame[column].isna().sum())
        if missing:
            raise ValueError(f"malformed interactions CSV at {location}: {missing} rows without {column}")
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    log.info("read %d interactions from %s with Spark", len(frame), location)
    return frame


@dataclass(frozen=True)
class HoldoutSplit:
    """The interactions to fit on and the newest window held back for publish's quality gate."""

    fit: pd.DataFrame
    holdout: pd.DataFrame | None
    # What the output's metadata.json says of the window: start, end, rows; or why there is none.
    info: dict[str, Any]


def split_holdout(interactions: pd.DataFrame, hours: float) -> HoldoutSplit:
    """Hold back the interactions of the last ``hours`` before the newest one (0: none).

    The candidate never sees them, so publish can judge it and the live model on the same unseen
    next-item pairs. No window when it would take more than half of the interactions (too little
    history to hold any back): the model fits on everything and the gate cannot judge it.
    """
    if hours <= 0:
        return HoldoutSplit(
            interactions, None, {"skipped": "no hold-out window (gate off or holdout_hours 0)"}
        )
    if len(interactions) == 0:
        return HoldoutSplit(interactions, None, {"skipped": "no interactions"})
    times = interactions["event_time"]
    end = times.max()
    start = end - pd.Timedelta(hours=hours)
    held = (times > start).to_numpy()
    if int(held.sum()) * 2 > len(interactions):
        reason = (
            f"the last {hours:g} h hold {int(held.sum())} of {len(interactions)} interactions "
            "(more than half): nothing held back"
        )
        log.warning("no hold-out window: %s", reason)
        return HoldoutSplit(interactions, None, {"skipped": reason})
    fit = _drop_unused_categories(interactions[~held].reset_index(drop=True))
    holdout = _drop_unused_categories(interactions[held].reset_index(drop=True))
    info = {"start": _iso(start), "end": _iso(end), "rows": len(holdout), "hours": hours}
    log.info("held back %d interactions after %s for the quality gate", len(holdout), info["start"])
    return HoldoutSplit(fit, holdout, info)


def _drop_unused_categories(frame: pd.DataFrame) -> pd.DataFrame:
    """Categorical ids keep only the values present: an item seen only in the held-back window
    must not enter the fitted model's vocabulary."""
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.CategoricalDtype):
            frame[column] = frame[column].cat.remove_unused_categories()
    return frame


def _iso(value: pd.Timestamp) -> str:
    return value.tz_convert("UTC").isoformat().replace("+00:00", "Z")


def train_model(
    interactions: pd.DataFrame, cfg: CarouselConfig, model_name: str | None = None
) -> tuple[Any, pd.DataFrame]:
    """Fit the model (``model_name``, default ``training.model.name``); returns it and its top-k."""
    from models import build_model

    model = build_model(model_name or cfg.training.model.name, cfg.training.model)
    started = time.perf_counter()
    model.fit(interactions)
    log.info(
        "trained %s on %d interactions in %.1fs",
        model.model_version,
        len(interactions),
        time.perf_counter() - started,
    )
    started = time.perf_counter()
    recommendations = model.recommend(cfg.training.top_k)
    log.info(
        "top-%d for %d items in %.1fs", cfg.training.top_k, len(model.item_ids), time.perf_counter() - started
    )
    return model, recommendations


def write_interactions_csv(interactions: pd.DataFrame, path: Path) -> str:
    """An interaction frame as a training CSV at ``path`` (the header of ``INTERACTION_COLUMNS``,
    ISO-8601 UTC times with microseconds), what :func:`read_training_input` reads back."""
    out = interactions[list(INTERACTION_COLUMNS)].copy()
    out["event_time"] = out["event_time"].dt.tz_convert("UTC").dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    out.to_csv(path, index=False)
    return str(path)


def write_model_output(
    model: Any,
    recommendations: pd.DataFrame,
    folder: Path,
    top_k: int,
    source: str,
    split: HoldoutSplit | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> dict:
    """Write the output layout described in the module docstring into a local ``folder``."""
    (folder / "recommendations").mkdir(parents=True, exist_ok=False)
    recommendations[list(RECOMMENDATION_COLUMNS)].to_csv(
        folder / "recommendations" / "part-00000.csv", index=False, float_format="%.6g"
    )
    holdout_info: dict[str, Any] = {"skipped": "no hold-out split"}
    data_end = None
    if split is not None:
        holdout_info = dict(split.info)
        if len(split.fit):
            data_end = _iso(split.fit["event_time"].max())
        if split.holdout is not None:
            (folder / HOLDOUT_DIR).mkdir()
            write_interactions_csv(split.holdout, folder / HOLDOUT_DIR / "part-00000.csv")
            holdout_info["path"] = f"{HOLDOUT_DIR}/"
    for name, dtype in TABLE_FILES.items():
        table = getattr(model, name, None)
        if table is not None:
            np.save(folder / f"{name}.npy", np.asarray(table, dtype=dtype))
    metadata = {
        **model.metadata(),
        "top_k": top_k,
        "input": source,
        "rows": len(recommendations),
        "items": [str(i) for i in model.item_ids],
        # The newest interaction the model was fitted on, and the window held back from it.
        "data_end": data_end,
        "holdout": holdout_info,
        **(extra_metadata or {}),
    }
    # Written last: an output folder without metadata.json is incomplete.
    (folder / "metadata.json").write_text(json.dumps(metadata, default=str))
    return metadata


def run(
    cfg: CarouselConfig,
    input_location: str,
    output: str | None = None,
    runner: str = "local",
    model_name: str | None = None,
) -> dict:
    """Read, train, write; returns the metadata with ``output`` added."""
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner {runner!r}; known: {RUNNERS}")
    model_name = model_name or cfg.training.model.name
    if runner == "aws-batch":
        return aws_batch.run(cfg, input_location, output, model_name)
    reader = read_training_input_with_spark if runner == "spark" else read_training_input
    gate = cfg.training.gate
    # Held back only for the gate to judge: with the gate off the model fits on everything.
    split = split_holdout(reader(input_location, cfg), gate.holdout_hours if gate.enabled else 0)
    model, recommendations = train_model(split.fit, cfg, model_name)
    return save_model_output(cfg, model, recommendations, output, input_location, split)


def save_model_output(
    cfg: CarouselConfig,
    model: Any,
    recommendations: pd.DataFrame,
    output: str | None,
    source: str,
    split: HoldoutSplit | None,
    extra_metadata: dict[str, Any] | None = None,
) -> dict:
    """Write the output to ``output`` (local or ``s3://``; default
    ``<training.workspace>/models/<model version>``); returns the metadata with ``output`` added."""
    output = output or objectstore.join(cfg.training.workspace, "models", model.model_version)
    if objectstore.is_s3(output):
        with tempfile.TemporaryDirectory(prefix="carousel-train-output-") as tmp:
            metadata = write_model_output(
                model, recommendations, Path(tmp) / "out", cfg.training.top_k, source, split, extra_metadata
            )
            client = objectstore.s3_client(cfg)
            # metadata.json last, so readers never see a half-uploaded output as complete.
            metadata_file = Path(tmp) / "out" / "metadata.json"
            metadata_text = metadata_file.read_text()
            metadata_file.unlink()
            objectstore.upload_dir(str(Path(tmp) / "out"), output, client=client)
            objectstore.write_text(objectstore.join(output, "metadata.json"), metadata_text, client=client)
    else:
        metadata = write_model_output(
            model, recommendations, Path(output), cfg.training.top_k, source, split, extra_metadata
        )
    log.info("wrote %d recommendations of %s to %s", len(recommendations), metadata["model_version"], output)
    return {**metadata, "output": output}


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="train", description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--input", required=True, help="snapshot folder, CSV folder or CSV file (local or s3://)"
    )
    parser.add_argument("--output", help="output folder (local or s3://); default under training.workspace")
    parser.add_argument("--runner", choices=RUNNERS, default="local")
    parser.add_argument("--model", help="a models.MODELS name (default: training.model.name, next_item2vec)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "train")
    try:
        result = run(cfg, args.input, args.output, args.runner, args.model)
    except (ValueError, FileNotFoundError, aws_batch.BatchJobError) as err:
        log.error("training failed: %s", err)
        return 1
    print(json.dumps({k: result[k] for k in ("model_version", "output", "n_items", "rows", "train_seconds")}))
    return 0
