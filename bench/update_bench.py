"""Online-update benchmark: one ``update-model`` run on 15 minutes at 5,000 interactions/s after a nightly.

Role: measure what an online update costs on this machine and what it learns, against the full
nightly retrain measured in the same run (the ceiling: what the update replaces until the next
night). Printed, written to JSON, never asserted (see bench/README.md).

Inputs: none. The simulator builds a world (``--items`` items in planted clusters of 5,
``--users`` users) and generates ``--base-interactions`` plus ``--rate`` x ``--minutes`` x 60
item interactions; the newest of them are the update's window, their times squeezed (in order)
into ``--minutes`` after the rest. Planted into the window: ``--new-pairs`` co-view patterns the
nightly model has never seen (``--pair-users`` new users each view item a, then item b of another
cluster) and ``--new-items`` new products (each viewed by ``--pair-users`` users, then a catalog
item). All of it is one Delta ``events`` table under a temp storage root (``--workdir`` keeps it).

Stages (seconds and peak RSS of this process and its children, as bench/training_bench.py):

1. **generate** / **load_events** - the simulator's interactions and the Delta table;
2. **nightly** - :func:`jobs.train.run` on the base interactions (before the window) and
   :func:`jobs.publish_recommendations.run`: the live model (the ceiling);
3. **update** - :func:`jobs.update_model.run` up to the window's end: read the window from Delta,
   warm-start, top-k, write, publish through the quality gate (its own read/train/publish split).

Figures: update seconds, their share of the 15-minute interval and their ratio to the nightly
retrain; the gate's decision; new-pattern recall@20 (share of planted pairs (a, b) with b in a's
top 20) before and after the update; new products with a list holding their partner; planted
cluster recall@5 of the nightly model and of the update (drift of what the window did not
change); the time from a pattern's first events to served lists, at worst one interval plus
``holdout_minutes`` plus the update's seconds plus ``serving.refresh_seconds``.

    .venv/bin/python -m bench.update_bench                   # 5M base, 15 min at 5,000/s (4.5M)
    .venv/bin/python -m bench.update_bench --base-interactions 500000 --rate 500 --items 10000 --users 20000
    make bench-update
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.training_bench import (
    PeakSampler,
    _machine_info,
    bench_simulator,
    generate_interactions,
    recs_planted_recall,
    write_events_table,
)
from carousel.cli import setup_logging
from carousel.config import load_config
from carousel.schemas import EVENTS_TABLE, ITEM_RECOMMENDATIONS_TABLE

log = logging.getLogger("bench.update")

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "update.json"
DRIFT_OUTPUT = Path(__file__).parent / "results" / "update-drift.json"
END_TIME = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)


def split_window(frame: pd.DataFrame, window_rows: int, minutes: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(base, window): the newest ``window_rows`` interactions, their times squeezed in order into
    ``minutes`` after the newest base interaction, and the rest."""
    frame = frame.sort_values("event_time", kind="stable").reset_index(drop=True)
    base, window = frame.iloc[:-window_rows].copy(), frame.iloc[-window_rows:].copy()
    start, end = base["event_time"].max(), window["event_time"].max()
    span = max((end - start).total_seconds(), 1e-9)
    offset = (window["event_time"] - start).dt.total_seconds() * (minutes * 60 / span)
    window["event_time"] = start + pd.to_timedelta(offset, unit="s")
    return base, window


def planted_window_rows(
    items: Sequence[str],
    planted: dict[str, list[str]],
    start: pd.Timestamp,
    minutes: float,
    new_pairs: int,
    new_items: int,
    users: int,
    seed: int,
) -> tuple[pd.DataFrame, list[tuple[str, str]], list[tuple[str, str]]]:
    """Views of new co-view pairs (a, b of different clusters) and of new products (then a
    catalog item) by new users at random times in the window; returns (rows, pairs, new items)."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(sorted(items), dtype=object)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < new_pairs:
        a, b = (str(x) for x in rng.choice(pool, 2, replace=False))
        if b not in planted.get(a, ()):
            pairs.append((a, b))
    products = [(f"bench-new-{n}", str(rng.choice(pool))) for n in range(new_items)]
    rows = []
    for kind, chosen in (("pair", pairs), ("product", products)):
        for p, (first, second) in enumerate(chosen):
            for u in range(users):
                at = start + pd.Timedelta(seconds=float(rng.uniform(0, minutes * 60 - 120)))
                user = f"bench-{kind}-{p}-{u}"
                for step, item in enumerate((first, second)):
                    rows.append(
                        {
                            "event_id": f"{user}-{step}",
                            "user_id": user,
                            "event_type": "Product Viewed",
                            "item_id": item,
                            "source": "web",
                            "event_time": at + pd.Timedelta(seconds=30 * step),
                        }
                    )
    return pd.DataFrame(rows), pairs, products


def pair_recall(lists: dict[str, list[str]], pairs: Sequence[tuple[str, str]]) -> float:
    """Share of the pairs (a, b) with b in a's list."""
    if not pairs:
        return float("nan")
    return sum(second in lists.get(first, ()) for first, second in pairs) / len(pairs)


def _live_lists(spark: Any, cfg: Any) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    live = spark.read.format("delta").load(cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE)).toPandas()
    live = live.sort_values(["item_id", "rank"])
    return live, live.groupby("item_id")["rec_item_id"].apply(list).to_dict()


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from carousel.session import build_session
    from jobs import publish_recommendations, train, update_model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="carousel-update-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    window_rows = int(args.rate * args.minutes * 60)
    cfg = load_config(
        overrides=[
            f"storage.root={workdir / 'storage'}",
            f"training.workspace={workdir / 'training'}",
            # The nightly model fits on all of the base: its data end is where the window starts.
            "training.gate.holdout_hours=0",
            f"training.online.interval_minutes={int(args.minutes)}",
            "spark.shuffle_partitions=4",
            f"spark.driver_memory={args.driver_memory}",
        ]
    )
    sim = bench_simulator(args.items, args.users, args.base_interactions + window_rows, args.days, args.seed)
    stages: dict[str, dict[str, float]] = {}
    sampler = PeakSampler()
    try:
        with sampler.stage("generate", stages):
            frame = generate_interactions(sim, args.base_interactions + window_rows, END_TIME)
            planted: dict[str, list[str]] = frame.attrs["planted"]
            base, window = split_window(frame, window_rows, args.minutes)
            del frame
            extra, pairs, products = planted_window_rows(
                base["item_id"].unique(),
                planted,
                base["event_time"].max(),
                args.minutes,
                args.new_pairs,
                args.new_items,
                args.pair_users,
                args.seed,
            )
            window = pd.concat([window, extra], ignore_index=True)
            base_end = base["event_time"].max()
            window_end = window["event_time"].max()
            base_csv = train.write_interactions_csv(base, workdir / "base.csv")
        spark = build_session(cfg, "carousel-update-bench", extra_conf={"spark.ui.enabled": "false"})
        spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
        machine = _machine_info(spark)
        with sampler.stage("load_events", stages):
            stored = write_events_table(
                spark,
                pd.concat([base, window], ignore_index=True),
                workdir / "events.parquet",
                cfg.storage.table(EVENTS_TABLE),
            )
        base_rows = len(base)
        del base
        with sampler.stage("nightly", stages):
            nightly = train.run(cfg, base_csv)
            publish_recommendations.run(spark, cfg, nightly["output"])
        nightly_recs, nightly_lists = _live_lists(spark, cfg)
        gate_error = None
        with sampler.stage("update", stages):
            try:
                summary = update_model.run(spark, cfg, end=window_end + timedelta(seconds=1))
            except publish_recommendations.GateRefusedError as err:
                gate_error, summary = str(err), {}
        gate_log = (
            spark.read.format("delta")
            .load(cfg.storage.table("model_publish_log"))
            .orderBy("attempted_at", ascending=False)
            .limit(1)
            .toPandas()
            .to_dict("records")[0]
        )
        # Refused by the gate: the output is still written, the newest under the updates folder.
        update_output = summary.get("model_output") or max(Path(update_model.updates_root(cfg)).iterdir())
        update_recs = pd.read_csv(Path(update_output) / "recommendations" / "part-00000.csv", dtype=str)
        update_lists = update_recs.groupby("item_id")["rec_item_id"].apply(list).to_dict()
    finally:
        sampler.close()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    update_seconds = stages["update"]["seconds"]
    interval = args.minutes * 60
    update_recs["rank"] = update_recs["rank"].astype(int)
    product_hits = [partner in update_lists.get(item, ()) for item, partner in products]
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "data": {
            "base_interactions": base_rows,
            "window_interactions": len(window),
            "window_minutes": args.minutes,
            "rate_per_second": args.rate,
            "events_table_rows": int(stored),
            "base_end": base_end.isoformat(),
            "window_end": window_end.isoformat(),
            "new_pairs": len(pairs),
            "new_products": len(products),
            "users_per_pattern": args.pair_users,
            "simulator": sim.model_dump(),
        },
        "nightly": {k: nightly.get(k) for k in ("model_version", "n_items", "train_seconds", "fit_params")},
        "update": {**summary, "gate_refused": gate_error},
        "gate": {k: gate_log.get(k) for k in ("decision", "reason", "pairs")},
        "stages": stages,
        "update_seconds": round(update_seconds, 1),
        "update_share_of_interval": round(update_seconds / interval, 3),
        "update_over_nightly": round(update_seconds / max(stages["nightly"]["seconds"], 1e-9), 3),
        # The pattern's first events just after an update read its window, or in its held-back
        # minutes: the next update, its run, and serve's lookups noticing the new Delta version.
        # A pattern in the update's held-back minutes waits for the next update.
        "pattern_to_served_seconds_worst": round(
            interval
            + cfg.training.online.holdout_minutes * 60
            + update_seconds
            + cfg.serving.refresh_seconds,
            1,
        ),
        "new_pattern_recall@20": {
            "nightly": pair_recall(nightly_lists, pairs),
            "update": pair_recall(update_lists, pairs),
        },
        "new_products_with_partner": float(np.mean(product_hits)) if product_hits else float("nan"),
        "new_products_with_a_list": sum(item in update_lists for item, _ in products),
        "planted_recall@5": {
            "nightly": round(recs_planted_recall(nightly_recs, planted, 5), 4),
            "update": round(recs_planted_recall(update_recs, planted, 5), 4),
        },
    }


def run_drift(args: argparse.Namespace) -> dict[str, Any]:
    """``--updates N``: N consecutive updates on equal slices of the simulator's own time line
    after a nightly model, against one full retrain on the same data; both judged on the day after
    (next-item Recall/MRR@20, ``evaluate``'s protocol)."""
    from carousel.session import build_session
    from jobs import publish_recommendations, train, update_model
    from jobs.evaluate import consecutive_pairs, ranking_metrics

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="carousel-update-drift-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        overrides=[
            f"storage.root={workdir / 'storage'}",
            f"training.workspace={workdir / 'training'}",
            "training.gate.holdout_hours=0",
            # Each slice spans hours of the simulator's time line: read all of it.
            "training.online.max_window_minutes=0",
            "spark.shuffle_partitions=4",
            f"spark.driver_memory={args.driver_memory}",
        ]
    )
    total = args.base_interactions + args.updates * args.update_interactions + args.test_interactions
    sim = bench_simulator(args.items, args.users, total, args.days, args.seed)
    k = 20
    stages: dict[str, dict[str, float]] = {}
    sampler = PeakSampler()
    updates: list[dict[str, Any]] = []
    try:
        with sampler.stage("generate", stages):
            frame = generate_interactions(sim, total, END_TIME)
            frame = frame.sort_values("event_time", kind="stable").reset_index(drop=True)
            base_rows = args.base_interactions
            test = frame.iloc[-args.test_interactions :]
            trained = frame.iloc[: -args.test_interactions]
            ends = [
                trained["event_time"].iloc[base_rows + (n + 1) * args.update_interactions - 1]
                for n in range(args.updates)
            ]
            base_csv = train.write_interactions_csv(trained.iloc[:base_rows], workdir / "base.csv")
            all_csv = train.write_interactions_csv(trained, workdir / "all.csv")
            pairs = consecutive_pairs(test)
        spark = build_session(cfg, "carousel-update-drift", extra_conf={"spark.ui.enabled": "false"})
        spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
        machine = _machine_info(spark)
        with sampler.stage("load_events", stages):
            write_events_table(spark, trained, workdir / "events.parquet", cfg.storage.table(EVENTS_TABLE))
        del frame
        with sampler.stage("nightly", stages):
            nightly = train.run(cfg, base_csv)
            publish_recommendations.run(spark, cfg, nightly["output"])
        nightly_recs, _ = _live_lists(spark, cfg)
        metrics = {"nightly only": ranking_metrics(nightly_recs, pairs, k)}
        with sampler.stage("updates", stages):
            for n, end in enumerate(ends):
                try:
                    summary = update_model.run(
                        spark, cfg, end=end.to_pydatetime() + timedelta(microseconds=1)
                    )
                except publish_recommendations.GateRefusedError as err:
                    summary = {"gate_refused": str(err)}
                updates.append(summary)
                log.info("update %d of %d: %s", n + 1, len(ends), summary.get("seconds") or summary)
        live_recs, _ = _live_lists(spark, cfg)
        metrics[f"after {args.updates} updates"] = ranking_metrics(live_recs, pairs, k)
        with sampler.stage("full_retrain", stages):
            full = train.run(cfg, all_csv, output=str(workdir / "full"))
        full_recs = pd.read_csv(
            Path(full["output"]) / "recommendations" / "part-00000.csv", dtype={"rank": int}
        )
        metrics["full retrain"] = ranking_metrics(full_recs, pairs, k)
    finally:
        sampler.close()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = [u["seconds"] for u in updates if "seconds" in u]
    full_metrics = metrics["full retrain"]
    updated = metrics[f"after {args.updates} updates"]
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "mode": "drift",
        "data": {
            "base_interactions": args.base_interactions,
            "updates": args.updates,
            "interactions_per_update": args.update_interactions,
            "test_interactions": args.test_interactions,
            "test_pairs": len(pairs[0]),
            "simulator": sim.model_dump(),
        },
        "metrics@20": {name: {key: round(v, 4) for key, v in m.items()} for name, m in metrics.items()},
        "updates_over_full": {
            key: round(updated[key] / full_metrics[key], 4)
            for key in ("recall@k", "mrr@k")
            if full_metrics[key]
        },
        "update_decisions": [
            "refused" if u.get("gate_refused") else "skipped" if u.get("skipped") else "published"
            for u in updates
        ],
        "update_seconds_mean": round(float(np.mean([sum(s.values()) for s in seconds])), 1)
        if seconds
        else None,
        "stages": stages,
    }


def print_drift_summary(result: dict[str, Any]) -> None:
    data = result["data"]
    print()
    print(
        f"{data['updates']} online updates of {data['interactions_per_update']:,} interactions after a "
        f"nightly model on {data['base_interactions']:,}, vs one full retrain; judged on "
        f"{data['test_pairs']:,} next-item pairs of the following interactions"
    )
    for name, figures in result["metrics@20"].items():
        print(f"  {name:<22} Recall@20 {figures['recall@k']:.4f}  MRR@20 {figures['mrr@k']:.4f}")
    print(f"updates / full retrain: {result['updates_over_full']}")
    print(f"update decisions: {result['update_decisions']}; mean update {result['update_seconds_mean']} s")
    for name, figures in result["stages"].items():
        print(f"  {name:<14}{figures['seconds']:>10.1f} s")


def print_summary(result: dict[str, Any]) -> None:
    data = result["data"]
    print()
    print(
        f"Online update: {data['window_interactions']:,} interactions in {data['window_minutes']:g} min "
        f"({data['rate_per_second']:,}/s) after a nightly model on {data['base_interactions']:,}"
    )
    print(f"{'stage':<14}{'seconds':>10}{'peak RSS GiB':>15}")
    for name, figures in result["stages"].items():
        print(f"{name:<14}{figures['seconds']:>10.1f}{figures['peak_rss_gib']:>15.2f}")
    print(f"update split: {result['update'].get('seconds')}; gate: {result['gate']['decision']}")
    print(
        f"update {result['update_seconds']:.1f} s = {result['update_share_of_interval']:.1%} of the "
        f"{data['window_minutes']:g}-minute interval; ratio to the nightly retrain "
        f"{result['update_over_nightly']:.2f}"
    )
    recall = result["new_pattern_recall@20"]
    print(
        f"new co-view patterns in the lists (recall@20): nightly {recall['nightly']:.3f}, "
        f"update {recall['update']:.3f}"
    )
    print(
        f"new products: {result['new_products_with_a_list']} of {data['new_products']} with a list, "
        f"{result['new_products_with_partner']:.1%} with their partner in it"
    )
    planted = result["planted_recall@5"]
    print(f"planted cluster recall@5: nightly {planted['nightly']:.3f}, update {planted['update']:.3f}")
    print(
        f"a new pattern reaches served lists within {result['pattern_to_served_seconds_worst']:.0f} s "
        "at worst"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.update_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--base-interactions", type=int, default=5_000_000)
    parser.add_argument("--rate", type=float, default=5000, help="interactions per second in the window")
    parser.add_argument("--minutes", type=float, default=15, help="the window (the update interval)")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--new-pairs", type=int, default=50)
    parser.add_argument("--new-items", type=int, default=50)
    parser.add_argument("--pair-users", type=int, default=50, help="new users viewing each planted pair")
    parser.add_argument(
        "--updates",
        type=int,
        default=0,
        help="drift mode: this many consecutive updates vs one full retrain (0: one timed update)",
    )
    parser.add_argument("--update-interactions", type=int, default=40_000, help="drift mode: per update")
    parser.add_argument("--test-interactions", type=int, default=200_000, help="drift mode: the judged day")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--workdir", help="keep tables and outputs here (default: a temp folder, deleted)")
    parser.add_argument(
        "--output", help="results JSON (default results/update.json, --updates: update-drift.json)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    result = run_drift(args) if args.updates else run_bench(args)
    out = Path(args.output or (DRIFT_OUTPUT if args.updates else DEFAULT_OUTPUT))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    (print_drift_summary if args.updates else print_summary)(result)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
