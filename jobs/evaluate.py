"""Offline evaluation: every item-to-item model side by side on a time split of the interactions.

Role: the yardstick of the models in :mod:`models`. The interactions are split by time (the last
``evaluation.test_days`` are the test set); each model is fitted on the train part and asked for
its top ``evaluation.k`` items per item; the test part says which item a user actually went to
next. The job writes a Markdown report and a bar chart, one row / group of bars per model.

Inputs (one of):

* ``--input FILE.csv`` - a training CSV (header ``user_id,item_id,event_type,event_time``, see
  :func:`models.interactions.read_interactions`);
* ``--input SNAPSHOT_DIR`` - a training snapshot of ``export-training-data`` (its
  ``interactions/*.csv`` files; a local folder or an ``s3://`` URI);
* ``--from-events`` - the Delta ``events`` table (item events with an ``item_id``), read with
  Spark; Spark is imported only on this path, CSV evaluation runs without a JVM.

Optionally ``--planted planted.json`` (the simulator's item -> planted neighbours); by default
``<storage.root>/simulator/planted.json`` is used when it exists (``--no-planted``: never).
Model hyperparameters come from ``training.model``; ``--test-days`` and ``--k`` override
``evaluation.test_days`` and ``evaluation.k``.

Outputs, under ``--output DIR`` (default ``<storage.root>/reports/evaluation/<UTC timestamp>``,
local or ``s3://``): ``evaluation.md`` (the table, best value per metric in bold),
``evaluation.png`` (Recall / MRR / NDCG per model) and ``evaluation.csv`` (the raw table). Exit
status 0; 1 when a model failed (its row carries the error, the others are still reported); 2 for
bad input (missing or malformed file, unknown model, empty train or test split).

Metrics (pure functions, vectorised with numpy / pandas):

* next-item pairs: every user's test interactions in time order, consecutive repeats collapsed;
  each consecutive pair (a, b), a != b, is one case (:func:`consecutive_pairs`);
* Recall@k: share of pairs with b among a's top k (an a without recommendations is a miss);
  MRR@k: mean of 1 / rank of b (0 when absent); NDCG@k: mean of 1 / log2(rank + 1) (one
  relevant item, so the ideal DCG is 1) (:func:`ranking_metrics`);
* coverage: share of the catalog (items seen in train or test) recommended somewhere
  (:func:`catalog_coverage`);
* popularity bias: mean train-popularity percentile of the recommended items, one value per
  recommendation slot; the percentile of an item is (mid-rank of its train count - 0.5) / n over
  the n train items (ties share their mean rank), so the least popular item is near 0, the most
  popular near 1, and recommending uniformly at random scores about 0.5; items unseen in train
  count 0 (:func:`popularity_bias`);
* planted recall: share of the planted (item, neighbour) pairs with the neighbour among the
  item's top k, over the catalog's items (:func:`planted_recall`).

    ./spark-submit.sh evaluate --input data/training/snapshot-2026-11-29
    ./spark-submit.sh evaluate --input interactions.csv --models item2vec,popularity --k 10 \\
        --test-days 1 --planted data/simulator/planted.json --output /tmp/eval
    ./spark-submit.sh evaluate --from-events
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carousel import objectstore
from carousel.cli import add_config_args, config_from_args, setup_logging
from carousel.config import CarouselConfig, ModelConfig
from carousel.schemas import EVENTS_TABLE, INTERACTION_COLUMNS, ITEM_EVENT_TYPES
from models import MODELS, build_model
from models.base import ItemToItemModel
from models.interactions import next_item_pairs, read_interactions, time_split

__all__ = [
    "METRICS",
    "InputError",
    "catalog_coverage",
    "consecutive_pairs",
    "evaluate_models",
    "load_interactions",
    "load_planted",
    "main",
    "planted_recall",
    "popularity_bias",
    "ranking_metrics",
    "run",
    "write_report",
]

log = logging.getLogger(__name__)

REPORT_NAME = "evaluation"
# Column -> (title in the report, which value is best: "max", "min" or None = not compared).
METRICS: dict[str, tuple[str, str | None]] = {
    "recall@k": ("Recall@{k}", "max"),
    "mrr@k": ("MRR@{k}", "max"),
    "ndcg@k": ("NDCG@{k}", "max"),
    "coverage": ("Coverage", "max"),
    "popularity_bias": ("Popularity bias", "min"),
    "planted_recall": ("Planted recall@{k}", "max"),
    "fit_seconds": ("Fit s", "min"),
    "n_items": ("Items", None),
    "n_pairs": ("Test pairs", None),
}
TABLE_COLUMNS: tuple[str, ...] = ("model", *METRICS, "k", "error")
_CHART_METRICS = ("recall@k", "mrr@k", "ndcg@k")


class InputError(ValueError):
    """The input cannot be evaluated (missing, malformed, empty split, unknown model)."""


# ---------------------------------------------------------------------------------------------
# Pure core: metrics
# ---------------------------------------------------------------------------------------------
def _ids(values: Any) -> np.ndarray:
    """Item ids as a plain object array of str (categoricals, numbers and str dtypes alike)."""
    return np.asarray(pd.Series(values, dtype=object).astype(str).to_numpy(), dtype=object)


def consecutive_pairs(test_df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(a_items, b_items): every user's consecutive distinct test items, a != b.

    Each user's interactions are taken in time order (ties keep the row order), consecutive
    repeats of one item collapsed; each step from one item to the next is a pair. Users come in
    id order, each user's pairs in time order. Users with a single distinct run give no pair.
    """
    a, b = next_item_pairs(test_df)
    return _ids(a), _ids(b)


def _top_k(recs: pd.DataFrame, k: int | None = None) -> pd.DataFrame:
    missing = [c for c in ("item_id", "rank", "rec_item_id") if c not in recs.columns]
    if missing:
        raise ValueError(f"recommendations lack the columns {missing}")
    top = recs if k is None else recs[recs["rank"].to_numpy() <= k]
    return pd.DataFrame(
        {
            "item_id": _ids(top["item_id"]),
            "rec_item_id": _ids(top["rec_item_id"]),
            "rank": top["rank"].to_numpy(dtype=np.int64),
        }
    )


def ranking_metrics(
    recs: pd.DataFrame, pairs: tuple[Sequence[Any], Sequence[Any]], k: int
) -> dict[str, float]:
    """Recall@k, MRR@k and NDCG@k of next-item ``pairs`` (a, b) against ``recs``' top-k lists.

    A pair is a hit when b is among a's recommendations of rank <= k; pairs whose a has no
    recommendations are misses. MRR counts 1 / rank, NDCG 1 / log2(rank + 1) (one relevant item:
    the ideal DCG is 1); misses count 0. Returns ``recall@k``, ``mrr@k``, ``ndcg@k`` (NaN when
    there are no pairs) and ``n_pairs``.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    a, b = _ids(pairs[0]), _ids(pairs[1])
    if len(a) != len(b):
        raise ValueError(f"pairs of unequal length: {len(a)} a items, {len(b)} b items")
    n_pairs = len(a)
    if n_pairs == 0:
        nan = float("nan")
        return {"recall@k": nan, "mrr@k": nan, "ndcg@k": nan, "n_pairs": 0}
    top = _top_k(recs, k).groupby(["item_id", "rec_item_id"], as_index=False, sort=False)["rank"].min()
    cases = pd.DataFrame({"item_id": a, "rec_item_id": b})
    ranks = cases.merge(top, on=["item_id", "rec_item_id"], how="left", validate="many_to_one")["rank"]
    rank = ranks.to_numpy(dtype=np.float64)  # NaN = miss
    hit = ~np.isnan(rank)
    reciprocal = np.where(hit, 1.0 / np.where(hit, rank, 1.0), 0.0)
    gain = np.where(hit, 1.0 / np.log2(np.where(hit, rank, 1.0) + 1.0), 0.0)
    return {
        "recall@k": float(hit.mean()),
        "mrr@k": float(reciprocal.mean()),
        "ndcg@k": float(gain.mean()),
        "n_pairs": int(n_pairs),
    }


def catalog_coverage(recs: pd.DataFrame, catalog_items: Sequence[Any]) -> float:
    """Share of the catalog's items that are recommended for at least one item (NaN: empty catalog).

    ``recs`` are the top-k lists as evaluated (every row counts); recommended items outside the
    catalog are ignored.
    """
    catalog = pd.unique(_ids(catalog_items))
    if len(catalog) == 0:
        return float("nan")
    recommended = pd.unique(_top_k(recs)["rec_item_id"].to_numpy())
    return float(np.isin(catalog, recommended).sum() / len(catalog))


def popularity_percentiles(train_df: pd.DataFrame) -> pd.Series:
    """Item id -> train popularity percentile in (0, 1): (mid-rank of its count - 0.5) / n items."""
    counts = pd.Series(_ids(train_df["item_id"])).value_counts()
    if counts.empty:
        return pd.Series(dtype=np.float64)
    return (counts.rank(method="average") - 0.5) / len(counts)


def popularity_bias(recs: pd.DataFrame, train_df: pd.DataFrame) -> float:
    """Mean train-popularity percentile of the recommended items (per slot; NaN without recs).

    See :func:`popularity_percentiles`: ~1 = only the most popular items are recommended, ~0.5 =
    no preference (uniform over the train items), lower = a leaning to the long tail. Items that
    never occur in ``train_df`` count 0.
    """
    rec_items = _top_k(recs)["rec_item_id"]
    if rec_items.empty:
        return float("nan")
    percentile = rec_items.map(popularity_percentiles(train_df)).fillna(0.0)
    return float(percentile.mean())


def planted_recall(recs: pd.DataFrame, planted: Mapping[str, Sequence[str]], k: int) -> float:
    """Share of the planted (item, neighbour) pairs whose neighbour is among the item's top k.

    ``planted`` maps an item to its planted neighbours (the simulator's ``planted.json``); items
    without recommendations count as misses. NaN when ``planted`` holds no pair.
    """
    a = [str(item) for item, others in planted.items() for _ in others]
    b = [str(other) for others in planted.values() for other in others]
    if not a:
        return float("nan")
    return ranking_metrics(recs, (a, b), k)["recall@k"]


def _restrict_planted(planted: Mapping[str, Sequence[str]], catalog: set[str]) -> dict[str, list[str]]:
    """The planted pairs among catalog items only (items nobody interacted with are unknowable)."""
    kept = {str(a): [str(b) for b in others if str(b) in catalog] for a, others in planted.items()}
    return {a: others for a, others in kept.items() if a in catalog and others}


# ---------------------------------------------------------------------------------------------
# Evaluation of the models
# ---------------------------------------------------------------------------------------------
def evaluate_models(
    train_df: pd.DataFrame,
    test_df: pd.DataFrame,
    model_names: Sequence[str],
    model_cfg: ModelConfig | None,
    k: int,
    planted: Mapping[str, Sequence[str]] | None = None,
    build: Callable[[str, ModelConfig | None], ItemToItemModel] = build_model,
) -> pd.DataFrame:
    """Fit every model on ``train_df`` and score its top-k lists on ``test_df``; one row per model.

    ``build`` makes a model from its name (default :func:`models.build_model`; a caller may wrap
    it, e.g. to add options).

    Columns: :data:`TABLE_COLUMNS` (``recall@k``, ``mrr@k``, ``ndcg@k``, ``coverage``,
    ``popularity_bias``, ``planted_recall`` (NaN without ``planted``), ``fit_seconds`` (``fit``
    plus ``recommend(k)``: the co-occurrence models do their work in the top-k step),
    ``n_items`` (the model's vocabulary), ``n_pairs``, ``k`` and ``error`` (empty, or why the model
    failed: its metrics are then NaN and the other models are still evaluated)).
    """
    unknown = [name for name in model_names if name not in MODELS]
    if unknown:
        raise InputError(f"unknown models {unknown}; known: {sorted(MODELS)}")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    pairs = consecutive_pairs(test_df)
    catalog = pd.unique(np.concatenate([_ids(train_df["item_id"]), _ids(test_df["item_id"])]))
    usable_planted = None
    if planted is not None:
        usable_planted = _restrict_planted(planted, set(catalog))
        n_planted = sum(len(v) for v in usable_planted.values())
        log.info("planted neighbours: %d pairs among %d catalog items", n_planted, len(usable_planted))
        if not n_planted:
            log.warning("no planted pair lies in the evaluated catalog: planted recall is NaN")
    log.info(
        "evaluating %s on %d train / %d test interactions, %d catalog items, %d test pairs, k=%d",
        ", ".join(model_names),
        len(train_df),
        len(test_df),
        len(catalog),
        len(pairs[0]),
        k,
    )
    rows = []
    for position, name in enumerate(model_names, start=1):
        row: dict[str, Any] = {column: float("nan") for column in METRICS}
        row.update(model=name, k=k, error="", n_pairs=len(pairs[0]))
        log.info("[%d/%d] %s: fitting", position, len(model_names), name)
        try:
            started = time.perf_counter()
            model = build(name, model_cfg).fit(train_df)
            recs = model.recommend(k)
            row["fit_seconds"] = time.perf_counter() - started
            row["n_items"] = model.metadata()["n_items"]
            row.update(ranking_metrics(recs, pairs, k))
            row["coverage"] = catalog_coverage(recs, catalog)
            row["popularity_bias"] = popularity_bias(recs, train_df)
            if usable_planted:
                row["planted_recall"] = planted_recall(recs, usable_planted, k)
        except Exception as err:  # one broken model must not hide the others' results
            log.exception("[%d/%d] %s failed", position, len(model_names), name)
            row["error"] = f"{type(err).__name__}: {err}"
            rows.append(row)
            continue
        log.info(
            "[%d/%d] %s: fit %.1f s, recall@%d %.4f, mrr %.4f, ndcg %.4f, coverage %.3f, "
            "popularity bias %.3f, planted recall %.3f",
            position,
            len(model_names),
            name,
            row["fit_seconds"],
            k,
            row["recall@k"],
            row["mrr@k"],
            row["ndcg@k"],
            row["coverage"],
            row["popularity_bias"],
            row["planted_recall"],
        )
        rows.append(row)
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def _format(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column in ("n_items", "n_pairs"):
        return f"{int(value):,}"
    if column == "fit_seconds":
        return f"{value:.2f}"
    return f"{value:.4f}"


def _markdown(table: pd.DataFrame, context: Mapping[str, Any] | None) -> str:
    k = int(table["k"].dropna().iloc[0]) if table["k"].notna().any() else "k"
    titles = [METRICS[c][0].format(k=k) for c in METRICS]
    lines = ["# Item-to-item model evaluation", ""]
    for key, value in (context or {}).items():
        lines.append(f"- {key}: {value}")
    if context:
        lines.append("")
    lines += ["| Model | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    best: dict[str, float] = {}
    for column, (_, direction) in METRICS.items():
        values = pd.to_numeric(table[column], errors="coerce").dropna()
        if direction and len(values) > 1:
            best[column] = values.max() if direction == "max" else values.min()
    for _, row in table.iterrows():
        cells = []
        for column in METRICS:
            text = _format(column, row[column])
            # Compare the rounded text, so that equal-looking values are bold alike.
            if column in best and text != "-" and text == _format(column, best[column]):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    failed = table[table["error"].astype(str) != ""]
    if len(failed):
        lines += ["", "Failed models:", ""]
        lines += [f"- {row['model']}: {row['error']}" for _, row in failed.iterrows()]
    lines += [
        "",
        "Best value per metric in bold (highest; lowest for popularity bias and fit time). "
        "Fit s: fitting plus computing the top-k lists. "
        f"Next-item pairs: consecutive distinct items of each user's test interactions; Recall@{k}: "
        f"share of pairs with the next item in the top {k}, MRR: mean 1/rank, NDCG: mean "
        "1/log2(rank+1), misses 0. Coverage: share of catalog items recommended anywhere. "
        "Popularity bias: mean train-popularity percentile of recommended items (0.5 = neutral, "
        "1 = only the most popular). Planted recall: share of the simulator's planted neighbours "
        f"found in the top {k}.",
        "",
        f"![Recall, MRR and NDCG per model]({REPORT_NAME}.png)",
        "",
    ]
    return "\n".join(lines)


def _chart(table: pd.DataFrame, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = int(table["k"].dropna().iloc[0]) if table["k"].notna().any() else "k"
    models = list(table["model"])
    figure = Figure(figsize=(max(6.0, 1.4 * len(models) + 2), 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(_CHART_METRICS)
    x = np.arange(len(models))
    for i, column in enumerate(_CHART_METRICS):
        values = pd.to_numeric(table[column], errors="coerce").fillna(0.0).to_numpy()
        offset = (i - (len(_CHART_METRICS) - 1) / 2) * width
        bars = axes.bar(x + offset, values, width, label=METRICS[column][0].format(k=k))
        axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    axes.set_xticks(x, models)
    axes.set_ylabel("score")
    top = np.nan_to_num(table[list(_CHART_METRICS)].to_numpy(dtype=float)).max(initial=0.0)
    axes.set_ylim(0, max(0.05, float(top) * 1.2))
    axes.set_title(f"Next-item ranking quality at k={k}")
    axes.legend(loc="upper right", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_report(
    table: pd.DataFrame, out_dir: str | os.PathLike[str], context: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """Write ``evaluation.md``, ``evaluation.png`` and ``evaluation.csv`` into the local ``out_dir``.

    ``context`` (optional) lists facts about the run at the top of the Markdown (data, split, k).
    Returns (Markdown path, PNG path).
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    md_path, png_path = folder / f"{REPORT_NAME}.md", folder / f"{REPORT_NAME}.png"
    _chart(table, png_path)
    table.to_csv(folder / f"{REPORT_NAME}.csv", index=False)
    md_path.write_text(_markdown(table, context))
    return md_path, png_path


# ---------------------------------------------------------------------------------------------
# Edges: inputs, command line
# ---------------------------------------------------------------------------------------------
def _read_csv(path: str) -> pd.DataFrame:
    try:
        return read_interactions(path)
    except ValueError as err:
        raise InputError(f"{path}: {err}") from None


def load_interactions(source: str, cfg: CarouselConfig | None = None) -> pd.DataFrame:
    """Interactions from a CSV file or a snapshot folder (``<dir>/interactions/*.csv``; local or S3)."""
    if objectstore.is_s3(source):
        with tempfile.TemporaryDirectory(prefix="carousel-evaluate-") as tmp:
            client = objectstore.s3_client(cfg) if cfg is not None else None
            if source.lower().endswith(".csv"):
                local = Path(tmp) / "input.csv"
                local.write_text(objectstore.read_text(source, client=client))
                return _read_csv(str(local))
            objectstore.download_dir(objectstore.join(source, "interactions"), tmp, client=client)
            return _load_snapshot_dir(tmp, source, data_dir=Path(tmp))
    path = objectstore.local_path(source)
    if path.is_file():
        return _read_csv(str(path))
    if path.is_dir():
        return _load_snapshot_dir(str(path), source)
    raise InputError(f"input {source!r} does not exist (expected a CSV file or a snapshot folder)")


def _load_snapshot_dir(root: str, source: str, data_dir: Path | None = None) -> pd.DataFrame:
    folder = data_dir if data_dir is not None else Path(root) / "interactions"
    files = sorted(glob.glob(str(folder / "*.csv")))
    if not files:
        raise InputError(f"snapshot {source!r} holds no interactions/*.csv files")
    if data_dir is None and not (Path(root) / "manifest.json").exists():
        log.warning("snapshot %s has no manifest.json: it may be incomplete", source)
    frames = [_read_csv(f) for f in files]
    df = pd.concat(frames, ignore_index=True)
    for column in ("user_id", "item_id", "event_type"):
        df[column] = df[column].astype(str).astype("category")
    log.info("read %d interactions from %d files of %s", len(df), len(files), source)
    return df


def read_events_table(cfg: CarouselConfig) -> pd.DataFrame:
    """Item interactions (item event types with an item_id) of the Delta events table, via Spark."""
    from pyspark.errors import AnalysisException  # imported here: CSV evaluation needs no Spark
    from pyspark.sql import functions as F

    from carousel.session import build_session

    spark = build_session(cfg, "carousel-evaluate")
    location = cfg.storage.table(EVENTS_TABLE)
    try:
        events = spark.read.format("delta").load(location)
    except AnalysisException as err:  # not a Delta table, or no such path
        raise InputError(f"cannot read the events table at {location}: {err}") from None
    rows = events.where(
        F.col("event_type").isin(list(ITEM_EVENT_TYPES)) & F.col("item_id").isNotNull()
    ).select(*INTERACTION_COLUMNS)
    frame = rows.toPandas()
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    for column in ("user_id", "item_id", "event_type"):
        frame[column] = frame[column].astype(str).astype("category")
    log.info("read %d item interactions from %s", len(frame), location)
    return frame


def load_planted(path: str, cfg: CarouselConfig | None = None) -> dict[str, list[str]]:
    """The simulator's ``planted.json`` (item -> planted neighbours)."""
    try:
        if objectstore.is_s3(path):
            client = objectstore.s3_client(cfg) if cfg is not None else None
            text = objectstore.read_text(path, client=client)
        else:
            text = Path(path).read_text()
        data = json.loads(text)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read planted neighbours {path!r}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise InputError(f"planted neighbours {path!r} must map each item to a list of items")
    return {str(item): [str(o) for o in others] for item, others in data.items()}


def _default_planted(cfg: CarouselConfig) -> str | None:
    path = cfg.storage.path("simulator", "planted.json")
    return path if not objectstore.is_s3(path) and Path(path).is_file() else None


def _publish(local_dir: Path, target: str, cfg: CarouselConfig) -> None:
    if objectstore.is_s3(target):
        objectstore.upload_dir(local_dir, target, client=objectstore.s3_client(cfg))


def run(
    cfg: CarouselConfig,
    interactions: pd.DataFrame,
    model_names: Sequence[str] | None = None,
    planted: Mapping[str, Sequence[str]] | None = None,
    output: str | None = None,
    source: str = "",
) -> tuple[pd.DataFrame, str]:
    """Split, evaluate every model, write the report; returns (table, output location)."""
    names = list(model_names or MODELS)
    k, test_days = cfg.evaluation.k, cfg.evaluation.test_days
    train_df, test_df = time_split(interactions, test_days)
    if len(train_df) == 0 or len(test_df) == 0:
        raise InputError(
            f"the time split (last {test_days:g} days = test) leaves {len(train_df)} train and "
            f"{len(test_df)} test interactions: both must be non-empty"
        )
    table = evaluate_models(train_df, test_df, names, cfg.training.model, k, planted=planted)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = output or cfg.storage.path("reports", "evaluation", stamp)
    times = pd.to_datetime(interactions["event_time"], utc=True)
    cutoff = pd.to_datetime(test_df["event_time"], utc=True).min()
    context = {
        "data": source or "interactions",
        "interactions": f"{len(interactions):,} ({len(train_df):,} train, {len(test_df):,} test)",
        "period": f"{times.min():%Y-%m-%d %H:%M} .. {times.max():%Y-%m-%d %H:%M} UTC",
        "split": f"test = the last {test_days:g} days (from {cutoff:%Y-%m-%d %H:%M} UTC)",
        "k": k,
        "planted neighbours": "yes" if planted else "no",
        "generated": f"{stamp} ({len(names)} models)",
    }
    if objectstore.is_s3(target):
        with tempfile.TemporaryDirectory(prefix="carousel-evaluate-") as tmp:
            write_report(table, tmp, context)
            _publish(Path(tmp), target, cfg)
    else:
        md_path, _ = write_report(table, objectstore.local_path(target), context)
        target = str(md_path.parent)
    log.info("evaluation report in %s\n%s", target, table.to_string(index=False))
    return table, target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate", description="Compare the item-to-item models offline on a time split."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="CSV_OR_SNAPSHOT_DIR", help="a training CSV or snapshot folder")
    source.add_argument("--from-events", action="store_true", help="read the Delta events table (Spark)")
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        metavar="A,B,...",
        help=f"models to compare (default: all: {','.join(MODELS)})",
    )
    parser.add_argument("--test-days", type=float, metavar="D", help="the last D days are the test set")
    parser.add_argument("--k", type=int, metavar="K", help="length of the recommendation lists")
    planted = parser.add_mutually_exclusive_group()
    planted.add_argument(
        "--planted",
        metavar="JSON",
        help="planted neighbours (default: <storage.root>/simulator/planted.json when it exists)",
    )
    planted.add_argument("--no-planted", action="store_true", help="do not compute the planted recall")
    parser.add_argument("--output", metavar="DIR", help="report folder (default: <storage.root>/reports/...)")
    return add_config_args(parser)


def main(argv: Sequence[str]) -> int:
    setup_logging()
    args = build_parser().parse_args(list(argv))
    overrides = [f"evaluation.test_days={args.test_days}"] if args.test_days is not None else []
    overrides += [f"evaluation.k={args.k}"] if args.k is not None else []
    cfg = config_from_args(args, "evaluate", overrides)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    try:
        unknown = [name for name in names if name not in MODELS]
        if not names or unknown:
            raise InputError(f"unknown models {unknown or names}; known: {','.join(MODELS)}")
        planted_path = None if args.no_planted else (args.planted or _default_planted(cfg))
        planted = load_planted(planted_path, cfg) if planted_path else None
        if planted_path:
            log.info("planted neighbours from %s", planted_path)
        if args.from_events:
            interactions, source = read_events_table(cfg), cfg.storage.table(EVENTS_TABLE)
        else:
            interactions, source = load_interactions(args.input, cfg), args.input
        table, _ = run(cfg, interactions, names, planted=planted, output=args.output, source=source)
    except InputError as err:
        log.error("%s", err)
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    failed = table.loc[table["error"] != "", "model"].tolist()
    if failed:
        log.error("models failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
