"""Training benchmark: the nightly pipeline end to end at 5M interactions, against gensim's Word2Vec.

Role: measure what the nightly training costs on this machine and how the TensorFlow model's
training speed compares with a well-optimised reference on the same data. Printed, written to
JSON, never asserted (see bench/README.md).

Inputs: none. The simulator builds a world (``--items`` items in planted clusters of 5,
``--users`` users) and generates events until ``--interactions`` item interactions exist; they are
written as a Delta ``events`` table under a temp storage root (``--workdir`` keeps it).

Stages (each timed, with the peak RSS of this process plus its children, the Spark JVM included,
sampled from /proc every 0.2 s):

1. **generate** - the simulator's events (Python) to a Parquet file;
2. **load events** - Spark writes them as the Delta ``events`` table (partitioned by day);
3. **export + validate** - :func:`jobs.export_training_data.run` (CSV snapshot + manifest + the
   Great Expectations suite);
4. **train: read** / **fit** / **top-k** / **write** - :func:`jobs.train.read_training_input`, the
   configured model's ``fit`` (``training.model.name``, default ``next_item2vec``) and
   ``recommend(training.top_k)``, :func:`jobs.train.write_model_output`;
5. **publish** - :func:`jobs.publish_recommendations.run` (validation gate + Delta version);
6. **gensim** - ``gensim.models.Word2Vec`` (skip-gram, negative sampling, all cores) on the same
   user sequences (:func:`models.interactions.user_sequences` of the snapshot), then the same exact
   cosine top-k (:func:`models.topk.top_k_similar`).

Figures: seconds and peak RSS per stage; the ratio *our fit / gensim's training* (the goal:
<= 2); planted recall@5 of both (share of each item's top 5 in its planted cluster; best possible
4 / 5 = 0.8); load averages. After the timed stages, ``--compare-blends`` re-ranks the same
next_item2vec fit with other ``cosine_blend`` values (0 = the next-item score alone) and reports
their planted recall@5 too (untimed; one exact top-k each), and ``--gensim-epochs`` trains
gensim again with other epoch counts (timed each) to find its time at our quality.

    .venv/bin/python -m bench.training_bench                          # 5,000,000 interactions / 100,000 items
    .venv/bin/python -m bench.training_bench --interactions 500000 --items 10000 --users 20000
    make bench-training
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import common
from carousel.cli import setup_logging
from carousel.config import CarouselConfig, SimulatorConfig, load_config
from carousel.schemas import EVENTS_PARTITION_COLUMN, EVENTS_SCHEMA, EVENTS_TABLE, ITEM_EVENT_TYPES

log = logging.getLogger("bench.training")

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "training.json"
END_TIME = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
# gensim's reference settings: word2vec's own skip-gram defaults at the configured size.
GENSIM_WINDOW = 5
GENSIM_NEGATIVES = 5
GENSIM_EPOCHS = 5
GENSIM_SAMPLE = 1e-3


# ---------------------------------------------------------------------------------------------
# Memory: RSS of this process and all its descendants, from /proc
# ---------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_rss_bytes(root: int | None = None) -> int:
    """RSS of ``root`` (default: this process) plus every descendant, in bytes."""
    pending, seen, total = [root or os.getpid()], set(), 0
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss_bytes(pid)
        pending += _children(pid)
    return total


class PeakSampler:
    """Samples :func:`tree_rss_bytes` in a thread; :meth:`stage` gives each stage's peak."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, tree_rss_bytes())
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def stage(self, name: str, results: dict[str, dict[str, float]]) -> Iterator[None]:
        self._peak = tree_rss_bytes()
        log.info("stage %s ...", name)
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            peak = max(self._peak, tree_rss_bytes())
            results[name] = {"seconds": round(seconds, 2), "peak_rss_gib": round(peak / 2**30, 2)}
            log.info("stage %s: %.1f s, peak RSS %.2f GiB", name, seconds, peak / 2**30)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def bench_simulator(items: int, users: int, interactions: int, days: int, seed: int) -> SimulatorConfig:
    """The training benchmarks' world: ``items`` in planted clusters of 5 over 20 categories,
    ``users``, clean events (no bad records or duplicates) over ``days - 1`` days, enough of them
    for ``interactions`` item interactions."""
    return SimulatorConfig(
        users=users,
        items=items,
        categories=20,
        cluster_size=5,
        events=2 * interactions,
        days=days - 1,
        rate=0,
        seed=seed,
        bad_share=0,
        duplicate_share=0,
    )


def generate_interactions(sim: SimulatorConfig, n_interactions: int, end: datetime) -> pd.DataFrame:
    """Simulator item events until ``n_interactions`` of them: event_id, user, type, item, time, source."""
    from jobs.simulate_events import build_world, generate_events

    world = build_world(sim)
    columns: dict[str, list[str]] = {
        k: [] for k in ("event_id", "user_id", "event_type", "item_id", "source")
    }
    times: list[str] = []
    # Generous upper bound: about 83 % of the simulator's events are item events.
    for event in generate_events(world, sim, 2 * n_interactions, end, sim.seed):
        if event["event_type"] not in ITEM_EVENT_TYPES:
            continue
        for column, values in columns.items():
            values.append(event[column])
        times.append(event["event_time"])
        if len(times) >= n_interactions:
            break
    frame = pd.DataFrame(columns)
    frame["event_time"] = pd.to_datetime(pd.Series(times), utc=True, format="ISO8601")
    frame.attrs["planted"] = world.planted_neighbours()
    return frame


def write_events_table(spark: Any, frame: pd.DataFrame, parquet: Path, location: str) -> int:
    """The interactions as the Delta ``events`` table (contract columns; the rest null or constant)."""
    from pyspark.sql import functions as F

    # Spark reads microsecond timestamps only (pandas writes nanoseconds by default).
    frame.to_parquet(parquet, index=False, coerce_timestamps="us", allow_truncated_timestamps=True)
    raw = spark.read.parquet(str(parquet))
    present = set(raw.columns)
    columns = []
    for field in EVENTS_SCHEMA.fields:
        if field.name in present:
            columns.append(F.col(field.name).cast(field.dataType).alias(field.name))
        elif field.name == EVENTS_PARTITION_COLUMN:
            columns.append(F.to_date("event_time").alias(field.name))
        elif field.name == "ingest_batch":
            columns.append(F.lit("bench").alias(field.name))
        elif field.name == "received_at":
            columns.append(F.col("event_time").cast(field.dataType).alias(field.name))
        else:
            columns.append(F.lit(None).cast(field.dataType).alias(field.name))
    events = raw.select(*columns)
    events.write.format("delta").mode("overwrite").partitionBy(EVENTS_PARTITION_COLUMN).save(location)
    return spark.read.format("delta").load(location).count()


def planted_recall_at(indices: np.ndarray, items: np.ndarray, planted: dict[str, list[str]], k: int) -> float:
    """Share of every item's top-k (index arrays) that lies in its planted cluster."""
    top = indices[:, :k]
    hits = total = 0
    for row, item in enumerate(items):
        neighbours = set(planted.get(str(item), ()))
        chosen = [items[j] for j in top[row] if j >= 0]
        hits += sum(1 for other in chosen if other in neighbours)
        total += len(chosen)
    return hits / total if total else float("nan")


def recs_planted_recall(recs: pd.DataFrame, planted: dict[str, list[str]], k: int) -> float:
    top = recs[recs["rank"] <= k]
    hits = [
        str(r) in set(planted.get(str(i), ()))
        for i, r in zip(top["item_id"], top["rec_item_id"], strict=True)
    ]
    return float(np.mean(hits)) if hits else float("nan")


def gensim_reference(
    interactions: pd.DataFrame,
    cfg: CarouselConfig,
    planted: dict[str, list[str]],
    k: int,
    epochs: int = GENSIM_EPOCHS,
) -> dict[str, Any]:
    """gensim Word2Vec (skip-gram, negative sampling) on the same user sequences; seconds and recall."""
    from gensim.models import Word2Vec

    from models.interactions import user_sequences
    from models.topk import top_k_similar

    model_cfg = cfg.training.model
    started = time.perf_counter()
    sequences = user_sequences(interactions, min_item_count=model_cfg.min_item_count)
    sentences = [list(map(str, s)) for s in sequences.split()]
    prepare = time.perf_counter() - started
    workers = os.cpu_count() or 1
    started = time.perf_counter()
    w2v = Word2Vec(
        sentences,
        vector_size=model_cfg.embedding_dim,
        window=GENSIM_WINDOW,
        negative=GENSIM_NEGATIVES,
        sg=1,
        epochs=epochs,
        min_count=1,
        sample=GENSIM_SAMPLE,
        workers=workers,
        seed=model_cfg.seed,
    )
    train_seconds = time.perf_counter() - started
    embeddings = np.zeros((sequences.n_items, model_cfg.embedding_dim), np.float32)
    for code in range(sequences.n_items):
        key = str(code)
        if key in w2v.wv.key_to_index:
            embeddings[code] = w2v.wv[key]
    started = time.perf_counter()
    indices, _ = top_k_similar(embeddings, k)
    topk_seconds = time.perf_counter() - started
    return {
        "prepare_seconds": round(prepare, 2),
        "train_seconds": round(train_seconds, 2),
        "topk_seconds": round(topk_seconds, 2),
        "workers": workers,
        "params": {
            "vector_size": model_cfg.embedding_dim,
            "window": GENSIM_WINDOW,
            "negative": GENSIM_NEGATIVES,
            "epochs": epochs,
            "sample": GENSIM_SAMPLE,
            "sg": 1,
        },
        "planted_recall@5": round(planted_recall_at(indices, sequences.items, planted, 5), 4),
        "version": metadata.version("gensim"),
    }


def compare_blends(model: Any, planted: dict[str, list[str]], alphas: Sequence[float]) -> dict[str, float]:
    """Planted recall@5 of one fitted next_item2vec re-ranked with each ``cosine_blend`` in ``alphas``.

    Models without :meth:`models.next_item2vec.NextItem2Vec.top_k` (a blend) give an empty dict.
    """
    if not alphas or not hasattr(model, "top_k"):
        return {}
    results: dict[str, float] = {}
    for alpha in alphas:
        started = time.perf_counter()
        indices, _ = model.top_k(5, cosine_blend=alpha)
        results[f"{alpha:g}"] = round(planted_recall_at(indices, model.item_ids, planted, 5), 4)
        log.info(
            "cosine_blend %g: planted recall@5 %.4f (top-k %.1f s)",
            alpha,
            results[f"{alpha:g}"],
            time.perf_counter() - started,
        )
    return results


def _alphas(text: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if any(not 0 <= value <= 1 for value in values):
        raise argparse.ArgumentTypeError(f"cosine blends must lie in 0..1, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _machine_info(spark: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "spark": spark.version,
    }
    for package in ("pyspark", "delta-spark", "tensorflow-cpu", "gensim", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[package.replace("-", "_")] = metadata.version(package)
    info.update(common.host_info())
    return info


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from carousel.session import build_session
    from jobs import export_training_data, publish_recommendations, train
    from models import build_model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="carousel-training-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    days = args.days
    cfg = load_config(
        overrides=[
            f"storage.root={workdir / 'storage'}",
            f"training.workspace={workdir / 'training'}",
            f"training.lookback_days={days}",
            f"training.max_lookback_days={max(days, 365)}",
            f"training.min_interactions={args.interactions}",
            "spark.shuffle_partitions=4",
            f"spark.driver_memory={args.driver_memory}",
        ]
    )
    sim = bench_simulator(args.items, args.users, args.interactions, days, args.seed)
    stages: dict[str, dict[str, float]] = {}
    sampler = PeakSampler()
    loads = {"start": os.getloadavg()}
    try:
        with sampler.stage("generate", stages):
            frame = generate_interactions(sim, args.interactions, END_TIME)
        planted: dict[str, list[str]] = frame.attrs["planted"]
        spark = build_session(cfg, "carousel-training-bench", extra_conf={"spark.ui.enabled": "false"})
        machine = _machine_info(spark)
        with sampler.stage("load_events", stages):
            stored = write_events_table(
                spark, frame, workdir / "events.parquet", cfg.storage.table(EVENTS_TABLE)
            )
        del frame
        with sampler.stage("export_validate", stages):
            snapshot = export_training_data.run(spark, cfg, end=END_TIME + timedelta(hours=1))
        with sampler.stage("train_read", stages):
            interactions = train.read_training_input(snapshot["output"], cfg)
        model = build_model(cfg.training.model.name, cfg.training.model)
        with sampler.stage("train_fit", stages):
            model.fit(interactions)
        with sampler.stage("train_topk", stages):
            recs = model.recommend(cfg.training.top_k)
        output = Path(cfg.training.workspace) / "models" / model.model_version
        with sampler.stage("train_write", stages):
            train.write_model_output(model, recs, output, cfg.training.top_k, snapshot["output"])
        with sampler.stage("publish", stages):
            table_version = publish_recommendations.run(spark, cfg, str(output))
        loads["after_pipeline"] = os.getloadavg()
        model_recall = recs_planted_recall(recs, planted, 5)
        meta = model.metadata()
        with sampler.stage("gensim", stages):
            reference = gensim_reference(interactions, cfg, planted, cfg.training.top_k)
        loads["end"] = os.getloadavg()
        by_blend = compare_blends(model, planted, args.compare_blends)
        # Untimed as stages: gensim at other epoch counts, for its time at comparable quality.
        by_epochs = {}
        for epochs in args.gensim_epochs:
            extra = gensim_reference(interactions, cfg, planted, cfg.training.top_k, epochs)
            by_epochs[str(epochs)] = {k: extra[k] for k in ("train_seconds", "planted_recall@5")}
    finally:
        sampler.close()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    pipeline = ("export_validate", "train_read", "train_fit", "train_topk", "train_write", "publish")
    ratio = stages["train_fit"]["seconds"] / max(reference["train_seconds"], 1e-9)
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "data": {
            "interactions": int(snapshot.get("rows", stored)),
            "events_table_rows": int(stored),
            "items": int(meta["n_items"]),
            "users": int(meta["n_users"]),
            "sequence_items": int(meta["n_sequence_items"]),
            "simulator": sim.model_dump(),
        },
        "model": {
            "name": model.name,
            "version": model.model_version,
            "params": meta["params"],
            "large_data": meta.get("large_data"),
            "fit_params": meta.get("fit_params"),
            "training_layout": meta.get("training_layout"),
            "epoch_seconds": meta.get("epoch_seconds"),
            "epoch_pairs": meta.get("epoch_pairs"),
            "epoch_loss": meta.get("epoch_loss"),
            "planted_recall@5": round(model_recall, 4),
            "planted_recall@5_by_cosine_blend": by_blend,
            "recommendation_rows": len(recs),
            "published_table_version": table_version,
        },
        "gensim": reference,
        "gensim_by_epochs": by_epochs,
        "stages": stages,
        "nightly_seconds": round(sum(stages[s]["seconds"] for s in pipeline), 1),
        "fit_over_gensim": round(ratio, 2),
        "fit_plus_topk_over_gensim_plus_topk": round(
            (stages["train_fit"]["seconds"] + stages["train_topk"]["seconds"])
            / max(reference["train_seconds"] + reference["topk_seconds"], 1e-9),
            2,
        ),
        "loadavg": loads,
    }


def print_summary(result: dict[str, Any]) -> None:
    data, model, ref = result["data"], result["model"], result["gensim"]
    print()
    print(
        f"Training benchmark: {data['interactions']:,} interactions, {data['items']:,} items, "
        f"{data['users']:,} users ({result['machine'].get('nproc')} cpus)"
    )
    print(f"{'stage':<18}{'seconds':>10}{'peak RSS GiB':>15}")
    for name, figures in result["stages"].items():
        print(f"{name:<18}{figures['seconds']:>10.1f}{figures['peak_rss_gib']:>15.2f}")
    print(f"nightly (export .. publish): {result['nightly_seconds']:.1f} s")
    if model.get("fit_params"):
        regime = "large-data" if model.get("large_data") else "default"
        print(f"{model['name']} {regime} settings: {model['fit_params']}")
    print(
        f"{model['name']} fit {result['stages']['train_fit']['seconds']:.1f} s vs gensim "
        f"{ref['train_seconds']:.1f} s: ratio {result['fit_over_gensim']:.2f} (goal <= 2); "
        f"with top-k {result['fit_plus_topk_over_gensim_plus_topk']:.2f}"
    )
    print(
        f"planted recall@5: {model['name']} {model['planted_recall@5']:.3f}, "
        f"gensim {ref['planted_recall@5']:.3f} (best possible 0.8)"
    )
    for alpha, recall in model.get("planted_recall@5_by_cosine_blend", {}).items():
        print(f"  same fit, cosine_blend {alpha}: planted recall@5 {recall:.3f}")
    for epochs, figures in result.get("gensim_by_epochs", {}).items():
        print(
            f"  gensim {epochs} epochs: {figures['train_seconds']:.1f} s, "
            f"planted recall@5 {figures['planted_recall@5']:.3f}"
        )
    print(f"load avg: {result['loadavg']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.training_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=5_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=10, help="the events span days - 1 days; lookback = days")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--workdir", help="keep tables and outputs here (default: a temp folder, deleted)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="results JSON")
    parser.add_argument(
        "--compare-blends",
        type=_alphas,
        default=[0.0],
        metavar="A1,A2",
        help="also rank the same next_item2vec fit with these cosine_blend values (untimed; '' = none)",
    )
    parser.add_argument(
        "--gensim-epochs",
        type=lambda text: [int(part) for part in text.split(",") if part.strip()],
        default=[],
        metavar="E1,E2",
        help="also train gensim with these epoch counts: its time at comparable quality (e.g. 10,15)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    result = run_bench(args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_summary(result)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
