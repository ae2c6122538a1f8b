"""Tests of the offline evaluation job (``jobs/evaluate.py``): fast, in memory, no Spark, no Kafka.

Hand-computed small cases pin the metric definitions (next-item pairs, Recall / MRR / NDCG@k,
coverage, popularity bias, planted recall); one end-to-end run of ``evaluate`` through its command
line on a small simulator world (200 items in planted clusters of 5, ~22k interactions, a small
item2vec) checks the report and that item2vec recovers the planted neighbours far better than
popularity.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from carousel.config import SimulatorConfig, load_config
from carousel.schemas import PRODUCT_VIEWED
from jobs import evaluate
from jobs.evaluate import (
    catalog_coverage,
    consecutive_pairs,
    evaluate_models,
    planted_recall,
    popularity_bias,
    ranking_metrics,
    write_report,
)
from jobs.simulate_events import build_world, interaction_rows
from models import MODELS
from models.interactions import time_split, to_csv_text

END = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A small, quick item2vec (the production defaults train far longer).
SMALL_MODEL = {
    "embedding_dim": 16,
    "window": 3,
    "negatives": 5,
    "epochs": 3,
    "batch_size": 256,
    "learning_rate": 0.01,
    "min_item_count": 1,
    "subsample": 0.001,
    "seed": 7,
}


def frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    """Interactions from (user, item, ISO time) triples; all Product Viewed."""
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": PRODUCT_VIEWED,
            "event_time": pd.to_datetime([r[2] for r in rows], utc=True, format="ISO8601"),
        }
    )


def recs_frame(lists: dict[str, list[str]]) -> pd.DataFrame:
    """A recommendation frame from item -> ranked list (scores decreasing)."""
    rows = [(item, rank, rec, 1.0 / rank) for item, recs in lists.items() for rank, rec in enumerate(recs, 1)]
    return pd.DataFrame(rows, columns=["item_id", "rank", "rec_item_id", "score"])


# A -> B C D, B -> A C; C, D, E have no recommendations.
RECS = recs_frame({"A": ["B", "C", "D"], "B": ["A", "C"]})


# ---------------------------------------------------------------------------------------------
# Next-item pairs
# ---------------------------------------------------------------------------------------------
def test_consecutive_pairs_follow_time_and_collapse_repeats():
    df = frame(
        [
            ("u2", "C", "2026-01-01T10:05:00Z"),
            ("u1", "A", "2026-01-01T10:00:00Z"),
            ("u1", "C", "2026-01-01T10:04:00Z"),
            ("u1", "A", "2026-01-01T10:01:00Z"),  # repeat of A: collapsed
            ("u2", "B", "2026-01-01T10:00:00Z"),
            ("u1", "B", "2026-01-01T10:02:00Z"),
            ("u1", "A", "2026-01-01T10:03:00+01:00"),  # 09:03 UTC: u1's first interaction
            ("u3", "D", "2026-01-01T10:00:00Z"),  # a single interaction: no pair
            ("u4", "E", "2026-01-01T10:00:00Z"),
            ("u4", "E", "2026-01-01T10:01:00Z"),  # only repeats: no pair
        ]
    )
    a, b = consecutive_pairs(df)
    # u1: A(09:03) A A B C -> A B C; u2: B C.
    assert list(zip(a, b, strict=True)) == [("A", "B"), ("B", "C"), ("B", "C")]
    assert all(x != y for x, y in zip(a, b, strict=True))


def test_consecutive_pairs_of_a_revisit_and_of_nothing():
    df = frame(
        [
            ("u", "A", "2026-01-01T00:00:00Z"),
            ("u", "B", "2026-01-01T00:01:00Z"),
            ("u", "A", "2026-01-01T00:02:00Z"),
        ]
    )
    a, b = consecutive_pairs(df)
    assert list(zip(a, b, strict=True)) == [("A", "B"), ("B", "A")]
    a, b = consecutive_pairs(df.iloc[:0])
    assert len(a) == len(b) == 0


# ---------------------------------------------------------------------------------------------
# Ranking metrics
# ---------------------------------------------------------------------------------------------
PAIRS = (
    ["A", "A", "B", "C", "A"],  # (C, A): C has no recommendations -> a miss
    ["C", "D", "D", "A", "B"],  # ranks 2, 3, miss, miss, 1
)


def test_ranking_metrics_by_hand_at_k3():
    m = ranking_metrics(RECS, PAIRS, k=3)
    assert m["n_pairs"] == 5
    assert m["recall@k"] == pytest.approx(3 / 5)
    assert m["mrr@k"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 5)
    assert m["ndcg@k"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4) + 1) / 5)


def test_ranking_metrics_cut_at_k():
    m = ranking_metrics(RECS, PAIRS, k=2)  # D at rank 3 no longer counts
    assert m["recall@k"] == pytest.approx(2 / 5)
    assert m["mrr@k"] == pytest.approx((1 / 2 + 1) / 5)
    assert m["ndcg@k"] == pytest.approx((1 / math.log2(3) + 1) / 5)
    m = ranking_metrics(RECS, PAIRS, k=1)
    assert (m["recall@k"], m["mrr@k"], m["ndcg@k"]) == pytest.approx((0.2, 0.2, 0.2))


def test_ranking_metrics_edge_cases():
    empty = ranking_metrics(RECS, ([], []), k=3)
    assert empty["n_pairs"] == 0 and math.isnan(empty["recall@k"])
    nothing = ranking_metrics(RECS.iloc[:0], PAIRS, k=3)
    assert (nothing["recall@k"], nothing["mrr@k"], nothing["ndcg@k"]) == (0.0, 0.0, 0.0)
    # Categorical and numpy inputs give the same answer as lists.
    cat = (pd.Categorical(PAIRS[0]), np.array(PAIRS[1], dtype=object))
    assert ranking_metrics(RECS, cat, k=3) == ranking_metrics(RECS, PAIRS, k=3)
    with pytest.raises(ValueError, match="k must be"):
        ranking_metrics(RECS, PAIRS, k=0)


# ---------------------------------------------------------------------------------------------
# Coverage, popularity bias, planted recall
# ---------------------------------------------------------------------------------------------
def test_catalog_coverage():
    # Recommended: B, C, D, A (and C again); the catalog has E too; X is not in the catalog.
    assert catalog_coverage(RECS, ["A", "B", "C", "D", "E"]) == pytest.approx(4 / 5)
    assert catalog_coverage(recs_frame({"A": ["X"]}), ["A", "B"]) == 0.0
    assert math.isnan(catalog_coverage(RECS, []))


def test_popularity_bias_is_the_mean_train_percentile_per_slot():
    train = frame(
        [("u", "A", "2026-01-01T00:00:00Z")] * 3
        + [("u", "B", "2026-01-01T00:00:00Z")] * 2
        + [("u", "C", "2026-01-01T00:00:00Z"), ("u", "D", "2026-01-01T00:00:00Z")]
    )
    # Counts A 3, B 2, C 1, D 1 -> mid-ranks 4, 3, 1.5, 1.5 -> (rank - 0.5) / 4: .875 .625 .25 .25
    # Slots: B C D | A C -> (.625 + .25 + .25 + .875 + .25) / 5
    assert popularity_bias(RECS, train) == pytest.approx(2.25 / 5)
    assert popularity_bias(recs_frame({"B": ["A"]}), train) == pytest.approx(0.875)
    assert popularity_bias(recs_frame({"A": ["E"]}), train) == 0.0  # never seen in train
    assert math.isnan(popularity_bias(RECS.iloc[:0], train))


def test_planted_recall():
    planted = {"A": ["B", "C"], "B": ["A"], "Z": ["A"]}  # Z has no recommendations
    assert planted_recall(RECS, planted, k=1) == pytest.approx(2 / 4)
    assert planted_recall(RECS, planted, k=2) == pytest.approx(3 / 4)
    assert math.isnan(planted_recall(RECS, {}, k=2))


# ---------------------------------------------------------------------------------------------
# evaluate_models and the report on tiny data
# ---------------------------------------------------------------------------------------------
TINY = frame(
    [
        (u, item, f"2026-01-0{day}T{hour:02d}:00:00Z")
        for day in (1, 2, 3)
        for u in ("u1", "u2", "u3")
        for hour, item in enumerate(("A", "B", "C") if u != "u3" else ("C", "A", "B"))
    ]
)


def test_a_failing_model_is_reported_and_the_others_still_run(tmp_path):
    def build(name, model_cfg=None):
        if name == "llr":
            raise RuntimeError("boom")
        return evaluate.build_model(name, model_cfg)

    cutoff = pd.Timestamp("2026-01-03", tz="UTC")
    train, test = TINY[TINY["event_time"] < cutoff], TINY[TINY["event_time"] >= cutoff]
    table = evaluate_models(train, test, ["popularity", "llr"], None, k=2, planted={"A": ["B"]}, build=build)
    assert list(table["model"]) == ["popularity", "llr"]
    assert table.loc[0, "error"] == "" and table.loc[1, "error"] == "RuntimeError: boom"
    assert table.loc[0, "n_pairs"] == 6 and table.loc[0, "n_items"] == 3
    assert 0 <= table.loc[0, "recall@k"] <= 1 and math.isnan(table.loc[1, "recall@k"])
    md_path, png_path = write_report(table, tmp_path / "report")
    text = md_path.read_text()
    assert "| popularity |" in text and "| llr |" in text and "RuntimeError: boom" in text
    assert png_path.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(evaluate.InputError, match="unknown models"):
        evaluate_models(train, test, ["nope"], None, k=2)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def cli(tmp_path, *args: str) -> list[str]:
    """Common flags: an isolated storage root (no default planted.json), no Kafka, no Spark."""
    return [*args, "--set", f"storage.root={tmp_path / 'storage'}"]


def test_bad_input_exits_with_status_2(tmp_path, capsys):
    missing = tmp_path / "missing.csv"
    assert evaluate.main(cli(tmp_path, "--input", str(missing))) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,type,time\nu,i,Product Viewed,2026-01-01T00:00:00Z\n")
    assert evaluate.main(cli(tmp_path, "--input", str(bad))) == 2
    assert "bad header" in capsys.readouterr().err
    empty_snapshot = tmp_path / "snapshot"
    (empty_snapshot / "interactions").mkdir(parents=True)
    assert evaluate.main(cli(tmp_path, "--input", str(empty_snapshot))) == 2
    assert "no interactions/*.csv" in capsys.readouterr().err
    good = tmp_path / "tiny.csv"
    good.write_text(to_csv_text(TINY))
    assert evaluate.main(cli(tmp_path, "--input", str(good), "--models", "popularity,bogus")) == 2
    assert "bogus" in capsys.readouterr().err
    assert evaluate.main(cli(tmp_path, "--input", str(good), "--test-days", "30")) == 2  # no train
    assert "train" in capsys.readouterr().err


@pytest.fixture(scope="module")
def world_csv(tmp_path_factory) -> tuple[str, str, int]:
    """A snapshot folder of ~22k item interactions of a 200-item world, its planted.json, rows."""
    cfg = SimulatorConfig(
        users=1000,
        items=200,
        categories=6,
        cluster_size=5,
        events=24000,
        days=5,
        rate=0,
        seed=3,
        bad_share=0,
        duplicate_share=0,
    )
    world = build_world(cfg)
    df = pd.DataFrame(interaction_rows(world, cfg, 24000, END, 3))
    df["event_time"] = pd.to_datetime(df["event_time"], utc=True, format="ISO8601")
    root = tmp_path_factory.mktemp("world")
    data = root / "snapshot" / "interactions"
    data.mkdir(parents=True)
    half = len(df) // 2  # two part files, as export-training-data writes them
    (data / "part-00000.csv").write_text(to_csv_text(df.iloc[:half]))
    (data / "part-00001.csv").write_text(to_csv_text(df.iloc[half:]))
    (root / "snapshot" / "manifest.json").write_text("{}")
    planted = root / "planted.json"
    planted.write_text(json.dumps(world.planted_neighbours()))
    return str(root / "snapshot"), str(planted), len(df)


def test_end_to_end_on_a_simulated_world(world_csv, tmp_path):
    snapshot, planted, n_rows = world_csv
    assert 18_000 <= n_rows <= 26_000
    model_flags = [
        arg for key, value in SMALL_MODEL.items() for arg in ("--set", f"training.model.{key}={value}")
    ]
    out = tmp_path / "report"
    argv = ["--input", snapshot, "--planted", planted, "--test-days", "1", "--k", "10", "--output", str(out)]
    assert evaluate.main(cli(tmp_path, *argv, *model_flags)) == 0

    md = (out / "evaluation.md").read_text()
    for name in MODELS:
        assert f"| {name} |" in md
    assert "Recall@10" in md and "NDCG@10" in md and "**" in md
    png = (out / "evaluation.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    from matplotlib.image import imread

    assert imread(str(out / "evaluation.png")).ndim == 3

    table = pd.read_csv(out / "evaluation.csv", keep_default_na=False, na_values=[""]).set_index("model")
    assert list(table.index) == list(MODELS)
    assert (table["error"].fillna("") == "").all()
    assert (table["k"] == 10).all() and (table["n_pairs"] > 1000).all()
    for column in ("recall@k", "mrr@k", "ndcg@k", "coverage", "popularity_bias", "planted_recall"):
        assert table[column].between(0, 1).all(), column
    # MRR <= NDCG <= Recall for a single relevant item.
    assert (table["mrr@k"] <= table["ndcg@k"] + 1e-12).all()
    assert (table["ndcg@k"] <= table["recall@k"] + 1e-12).all()
    # Quality sanity (not the final bar): item2vec finds the planted clusters, popularity cannot.
    item2vec, popularity = table.loc["item2vec"], table.loc["popularity"]
    assert item2vec["planted_recall"] >= 0.6
    assert item2vec["planted_recall"] >= popularity["planted_recall"] + 0.4
    assert item2vec["recall@k"] > popularity["recall@k"]
    assert popularity["popularity_bias"] > 0.9 and popularity["coverage"] < 0.1
    assert item2vec["coverage"] > 0.9


def test_next_item2vec_meets_the_quality_bar():
    """The issue's bar: the default TensorFlow model beats every baseline on Recall@20 and MRR@20.

    A 500-item world (planted clusters of 5, ~67k item interactions, the last day = test); the
    production hyperparameters of conf/carousel.yaml, nothing tuned for the test.
    """
    sim = SimulatorConfig(
        users=3000,
        items=500,
        categories=6,
        cluster_size=5,
        events=80000,
        days=6,
        rate=0,
        seed=3,
        bad_share=0,
        duplicate_share=0,
    )
    world = build_world(sim)
    df = pd.DataFrame(interaction_rows(world, sim, sim.events, END, 3))
    df["event_time"] = pd.to_datetime(df["event_time"], utc=True, format="ISO8601")
    train, test = time_split(df, 1)
    model_cfg = load_config().training.model
    assert model_cfg.name == "next_item2vec"
    baselines = ["popularity", "item_knn", "llr", "sequential_rules"]
    table = evaluate_models(train, test, [model_cfg.name, *baselines], model_cfg, 20).set_index("model")
    assert (table["error"] == "").all() and (table["n_pairs"] > 5000).all()
    ours = table.loc[model_cfg.name]
    for name in baselines:
        for metric in ("recall@k", "mrr@k"):
            assert ours[metric] > table.loc[name, metric], (
                f"{model_cfg.name} {metric} {ours[metric]:.4f} <= {name} {table.loc[name, metric]:.4f}"
            )
