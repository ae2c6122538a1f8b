"""Online model updates: warm-start the live next_item2vec model on the newest events and publish it.

Role: what the scheduler launches every ``training.online.interval_minutes`` (15) between the
nightly runs, so that new co-view patterns and new products reach the served lists within the
quarter hour instead of the next night. The nightly full retrain stays the reset.

Inputs:

* the live model: the commit of ``item_recommendations`` that published it names its ``train``
  output folder (local or ``s3://``; older commits: ``<training.workspace>/models/<version>``),
  whose ``metadata.json``, ``embeddings.npy``, ``output_embeddings.npy`` and ``token_counts.npy``
  are the start (``next_item2vec`` only: its tables are what a warm start continues);
* the Delta ``events`` table: the interactions (``training.event_types``) after the live model's
  data end, plus ``training.online.context_minutes`` before it so that pairs spanning the
  boundary are learned, up to ``--end`` (default now).

How: :class:`models.next_item2vec.NextItem2Vec` with a :class:`~models.next_item2vec.WarmStart`,
the live model's hyperparameters, ``training.online.epochs`` passes at
``training.online.learning_rate``; items new in the events (``min_item_count`` of them) join the
vocabulary with fresh rows, every earlier item keeps its list. The newest
``training.online.holdout_minutes`` are held back for the quality gate; the next update trains
on them (it reads from this model's data end).

Outputs: a ``train`` output folder (same layout; ``metadata.json`` adds ``update``: the parent
model, the window, new items and interactions) under ``<training.workspace>/models/updates/<version>``
(all but the newest ``training.online.keep_outputs`` and the live one are then deleted),
published through ``publish-recommendations``' validation and quality gate as a new version of
``item_recommendations`` (or refused, the live version untouched, exit 1). Fewer than
``training.online.min_interactions`` new interactions: nothing to learn yet, exit 0, no version.

    ./spark-submit.sh update-model [--end ISO-8601] [--force]
    # cron, every 15 minutes (conf/scheduling/crontab.example; Airflow: airflow_dag_example.py):
    # */15 * * * * cd /opt/carousel && ./spark-submit.sh update-model >> logs/update-model.log 2>&1
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from botocore.exceptions import BotoCoreError, ClientError
from pyspark.sql import SparkSession

from carousel import objectstore
from carousel.cli import add_config_args, config_from_args, iso_time
from carousel.config import CarouselConfig
from carousel.errors import JobError
from carousel.schemas import EVENTS_TABLE, INTERACTION_COLUMNS, ITEM_RECOMMENDATIONS_TABLE
from carousel.session import build_session
from carousel.storage import table_exists
from jobs import export_training_data, publish_recommendations, train
from models.next_item2vec import NextItem2Vec, WarmStart

log = logging.getLogger(__name__)

# Update outputs go to <training.workspace>/models/<UPDATES_DIR>/<version>; older ones are pruned.
UPDATES_DIR = "updates"
# The live output's files a warm start reads, besides metadata.json.
WARM_START_FILES = tuple(f"{name}.npy" for name in ("embeddings", "output_embeddings", "token_counts"))


class UpdateRefusedError(JobError):
    """No update can start from the live model (none, not next_item2vec, an incomplete output)."""


@dataclass(frozen=True)
class LiveStart:
    """The live model an update continues: its version, data end, output folder and tables."""

    model_version: str
    data_end: datetime
    location: str
    params: dict[str, Any]
    warm_start: WarmStart


# ---------------------------------------------------------------------------------------------
# Pure core
# ---------------------------------------------------------------------------------------------
def update_window(
    data_end: datetime, end: datetime, context_minutes: float, max_window_minutes: float = 0
) -> tuple[datetime, datetime]:
    """The events an update reads: from ``context_minutes`` before the live data end up to ``end``,
    but no more than the last ``max_window_minutes`` (0: no limit) before ``end``."""
    if end <= data_end:
        raise UpdateRefusedError(
            f"--end {end.isoformat()} is not after the live model's data end {data_end.isoformat()}"
        )
    start = data_end - timedelta(minutes=context_minutes)
    if max_window_minutes > 0:
        start = max(start, end - timedelta(minutes=max_window_minutes))
    return start, end


def warm_start_from(
    metadata: dict[str, Any], tables: dict[str, np.ndarray], epochs: int, data_end: datetime | None = None
) -> WarmStart:
    """The :class:`WarmStart` of a ``train`` output's metadata and tables (fitted up to
    ``data_end``), training ``epochs``."""
    fit_params = dict(metadata.get("fit_params") or {})
    fit_params["epochs"] = epochs
    try:
        return WarmStart(
            items=np.asarray([str(item) for item in metadata["items"]], dtype=object),
            input_table=tables["embeddings"],
            output_table=tables["output_embeddings"],
            token_counts=tables["token_counts"],
            fit_params=fit_params,
            large_data=bool(metadata.get("large_data", False)),
            data_end=data_end,
        )
    except (ValueError, KeyError, TypeError) as err:
        raise UpdateRefusedError(f"the live model {metadata.get('model_version')}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Edges: the live model, the events, the update
# ---------------------------------------------------------------------------------------------
def load_live(spark: SparkSession, cfg: CarouselConfig) -> LiveStart:
    """The live model's output, checked to be one a warm start can continue."""
    table = cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE)
    live = publish_recommendations.live_model(spark, table)
    if live is None:
        raise UpdateRefusedError(
            f"nothing is published in {table} yet: run nightly (or train and publish-recommendations) first"
        )
    version = live.model_version
    location = live.location or objectstore.join(cfg.training.workspace, "models", version)
    with tempfile.TemporaryDirectory(prefix="carousel-update-live-") as tmp:
        local = _fetch_live_files(cfg, location, Path(tmp))
        metadata_file = local / "metadata.json"
        if not metadata_file.is_file():
            raise UpdateRefusedError(
                f"the live model {version} has no metadata.json at {location}: its train output is "
                "gone; the next nightly run publishes one to start from"
            )
        try:
            metadata = json.loads(metadata_file.read_text())
            params = dict(metadata.get("params") or {})
        except (ValueError, TypeError, AttributeError) as err:
            raise UpdateRefusedError(
                f"the live model {version}: unreadable metadata.json at {location}: {err}"
            ) from None
        if metadata.get("name") != NextItem2Vec.name or params.get("loss", "softmax") != "softmax":
            raise UpdateRefusedError(
                f"the live model {version} is {metadata.get('name')!r} (loss {params.get('loss')!r}): "
                f"update-model warm-starts {NextItem2Vec.name} with the sampled-softmax loss only; "
                "the nightly run retrains the others"
            )
        missing = [name for name in WARM_START_FILES if not (local / name).is_file()]
        if missing:
            raise UpdateRefusedError(
                f"the live model {version} has no {', '.join(missing)} at {location} (trained before "
                "update-model existed): the next nightly run writes them"
            )
        if live.data_end is None:
            raise UpdateRefusedError(f"the live model {version}: its publish recorded no data end")
        try:
            tables = {Path(name).stem: np.load(local / name, allow_pickle=False) for name in WARM_START_FILES}
        except (ValueError, OSError, EOFError) as err:
            raise UpdateRefusedError(
                f"the live model {version}: unreadable tables at {location}: {err}"
            ) from None
    return LiveStart(
        version,
        live.data_end,
        location,
        params,
        warm_start_from(metadata, tables, cfg.training.online.epochs, live.data_end),
    )


def _fetch_live_files(cfg: CarouselConfig, location: str, tmp: Path) -> Path:
    """The folder holding the live output's metadata and tables: ``location`` itself when local;
    for ``s3://`` only those files (not its recommendations), downloaded into ``tmp``."""
    if not objectstore.is_s3(location):
        return objectstore.local_path(location)
    client = objectstore.s3_client(cfg)
    for name in ("metadata.json", *WARM_START_FILES):
        uri = objectstore.join(location, name)
        if objectstore.exists(uri, client=client):
            bucket, key = objectstore.split_s3(uri)
            client.download_file(bucket, key, str(tmp / name))
    return tmp


def updates_root(cfg: CarouselConfig) -> str:
    """Where update outputs go: ``<training.workspace>/models/updates`` (one folder per version)."""
    return objectstore.join(cfg.training.workspace, "models", UPDATES_DIR)


def prune_updates(cfg: CarouselConfig, keep: int, protect: str | None = None) -> list[str]:
    """Delete all but the newest ``keep`` update outputs (and ``protect``, the live one); returns
    the deleted folders. Version names start with the fit time, so name order is time order."""
    root = updates_root(cfg)
    client = objectstore.s3_client(cfg) if objectstore.is_s3(root) else None
    versions = sorted({name.split("/", 1)[0] for name in objectstore.list_files(root, client=client)})
    protected = {protect.rstrip("/")} if protect else set()
    deleted = []
    for version in versions[: max(0, len(versions) - keep)]:
        folder = objectstore.join(root, version)
        if folder.rstrip("/") in protected or str(Path(folder).resolve()) in protected:
            continue
        objectstore.delete_prefix(folder, client=client)
        deleted.append(folder)
    if deleted:
        log.info(
            "removed %d older update outputs under %s (training.online.keep_outputs=%d)",
            len(deleted),
            root,
            keep,
        )
    return deleted


def _prune_quietly(cfg: CarouselConfig, protect: str | None) -> None:
    """:func:`prune_updates`, logging a failure instead of raising it: the update's own outcome
    (published or refused) is what the job reports; the next update prunes again."""
    try:
        prune_updates(cfg, cfg.training.online.keep_outputs, protect=protect)
    except (OSError, BotoCoreError, ClientError) as err:
        log.warning("could not remove older update outputs under %s: %s", updates_root(cfg), err)


def read_interactions(
    spark: SparkSession, cfg: CarouselConfig, start: datetime, end: datetime
) -> pd.DataFrame:
    """The interactions of the events table with ``start <= event_time < end``, on the driver."""
    location = cfg.storage.table(EVENTS_TABLE)
    if not table_exists(spark, location):
        raise UpdateRefusedError(f"no events table at {location}: run ingest first")
    events = spark.read.format("delta").load(location)
    frame = export_training_data.interactions(events, start, end, cfg.training.event_types).toPandas()
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    return frame[list(INTERACTION_COLUMNS)]


def run(spark: SparkSession, cfg: CarouselConfig, end: datetime | None = None, force: bool = False) -> dict:
    """One update: read, warm-start, write and publish; returns what it did (and its seconds).

    ``{"skipped": reason, ...}`` when too few interactions arrived since the live data end.
    Raises :class:`UpdateRefusedError` (no live model to start from) or
    :class:`~jobs.publish_recommendations.PublishRefusedError` (refused by validation or the gate).
    """
    online = cfg.training.online
    timings: dict[str, float] = {}
    started = time.perf_counter()
    live = load_live(spark, cfg)
    start, end = update_window(
        live.data_end, end or datetime.now(UTC), online.context_minutes, online.max_window_minutes
    )
    if start > live.data_end:
        log.warning(
            "the live model's data end %s is more than training.online.max_window_minutes=%g before "
            "%s: this update reads from %s; the interactions between are left to the next nightly run",
            live.data_end.isoformat(),
            online.max_window_minutes,
            end.isoformat(),
            start.isoformat(),
        )
    frame = read_interactions(spark, cfg, start, end)
    new = int((frame["event_time"] > pd.Timestamp(live.data_end)).sum())
    timings["read"] = time.perf_counter() - started
    log.info(
        "live model %s (data end %s): read %d interactions from %s to %s, %d of them new",
        live.model_version,
        live.data_end.isoformat(),
        len(frame),
        start.isoformat(),
        end.isoformat(),
        new,
    )
    summary: dict[str, Any] = {"live_model_version": live.model_version, "new_interactions": new}
    if new < online.min_interactions:
        reason = (
            f"{new} new interactions since {live.data_end.isoformat()}, fewer than "
            f"training.online.min_interactions={online.min_interactions}: nothing published"
        )
        log.info("update skipped: %s", reason)
        return {**summary, "skipped": reason}

    started = time.perf_counter()
    gate = cfg.training.gate
    split = train.split_holdout(frame, online.holdout_minutes / 60 if gate.enabled else 0)
    params = {**live.params, "learning_rate": online.learning_rate}
    model = NextItem2Vec(None, warm_start=live.warm_start, **params).fit(split.fit)
    recommendations = model.recommend(cfg.training.top_k)
    new_items = sorted(set(map(str, model.item_ids)) - set(map(str, live.warm_start.items)))
    timings["train"] = time.perf_counter() - started
    log.info(
        "warm-started %s from %s on %d interactions in %.1fs: %d items (%d new)",
        model.model_version,
        live.model_version,
        len(split.fit),
        timings["train"],
        len(model.item_ids),
        len(new_items),
    )
    warm = {
        "parent_model_version": live.model_version,
        "parent_output": live.location,
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "new_interactions": new,
        "new_items": len(new_items),
        "epochs": online.epochs,
        "learning_rate": online.learning_rate,
    }
    source = f"{cfg.storage.table(EVENTS_TABLE)} [{start.isoformat()}, {end.isoformat()})"
    location = objectstore.join(updates_root(cfg), model.model_version)
    output = train.save_model_output(cfg, model, recommendations, location, source, split, {"update": warm})

    current = publish_recommendations.live_model(spark, cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE))
    if current is None or current.model_version != live.model_version:
        # Published meanwhile (a nightly run, a rollback): this update continues an older model.
        reason = (
            f"the live model changed from {live.model_version} to "
            f"{current.model_version if current else None} while this update trained: not "
            "published; the next update starts from the new one"
        )
        log.warning("update skipped: %s", reason)
        _prune_quietly(cfg, current.location if current else None)
        return {**summary, "skipped": reason, "model_output": output["output"]}
    started = time.perf_counter()
    try:
        version = publish_recommendations.run(spark, cfg, output["output"], force, job="update-model")
    finally:
        # Refused or not: the live output (this one or its parent) stays, older updates go.
        _prune_quietly(cfg, live.location)
    timings["publish"] = time.perf_counter() - started
    summary.update(
        {
            "model_version": model.model_version,
            "model_output": output["output"],
            "table_version": version,
            "items": len(model.item_ids),
            "new_items": len(new_items),
            "seconds": {key: round(value, 1) for key, value in timings.items()},
        }
    )
    log.info("update done: %s", json.dumps(summary, default=str))
    return summary


def main(argv: list[str]) -> int:
    parser = add_config_args(
        argparse.ArgumentParser(prog="update-model", description=__doc__.splitlines()[0])
    )
    parser.add_argument("--end", type=iso_time, help="read events up to this time (ISO-8601, default now)")
    parser.add_argument(
        "--force", action="store_true", help="publish even if the quality gate refuses the update (recorded)"
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "update-model")
    spark = build_session(
        cfg, "carousel-update-model", extra_conf={"spark.sql.execution.arrow.pyspark.enabled": "true"}
    )
    try:
        summary = run(spark, cfg, end=args.end, force=args.force)
    except publish_recommendations.PublishRefusedError as err:
        log.error("update not published: %s", err)
        return 1
    except FloatingPointError as err:  # training diverged: nothing was written
        log.error("update failed: %s", err)
        return 1
    print(json.dumps(summary, default=str))
    return 0
