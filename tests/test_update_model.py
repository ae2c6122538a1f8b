"""Online model updates: a warm start keeps the vocabulary and learns what happened since the live model."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from delta.tables import DeltaTable
from pyspark.sql import functions as F
from support import event_json, store_event_records

from carousel.config import load_config
from carousel.schemas import ITEM_RECOMMENDATIONS_TABLE, MODEL_PUBLISH_LOG_TABLE
from jobs import nightly, update_model
from jobs import simulate_events as sim
from models.interactions import user_sequences
from models.next_item2vec import NextItem2Vec, WarmStart

END = datetime.now(UTC).replace(microsecond=0)


# ---------------------------------------------------------------------------------------------
# The pure parts
# ---------------------------------------------------------------------------------------------
def _views(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """(user, item, seconds) rows as an interaction frame."""
    return pd.DataFrame(
        [
            (user, item, "Product Viewed", pd.Timestamp(seconds, unit="s", tz="UTC"))
            for user, item, seconds in rows
        ],
        columns=["user_id", "item_id", "event_type", "event_time"],
    )


def test_known_items_stay_in_the_vocabulary_with_any_count() -> None:
    frame = _views([("u1", "b", 1), ("u1", "new", 2), ("u2", "new", 1), ("u2", "rare", 2)])
    sequences = user_sequences(frame, min_item_count=2, known_items=np.array(["c", "a", "b"], dtype=object))

    # Known items stay (a and c without a single interaction, b with one); new ones need two.
    assert sequences.items.tolist() == ["a", "b", "c", "new"]
    assert sequences.counts.tolist() == [0, 1, 0, 2]
    assert [s.tolist() for s in sequences.split()] == [[1, 3], [3]]  # "rare" dropped
    # Without known items it is the usual vocabulary.
    assert user_sequences(frame, min_item_count=2).items.tolist() == ["new"]


def test_update_window_reads_the_context_at_most_the_last_window_and_refuses_an_earlier_end() -> None:
    data_end = datetime(2026, 12, 1, 12, tzinfo=UTC)
    end = data_end + timedelta(minutes=15)
    assert update_model.update_window(data_end, end, 10) == (data_end - timedelta(minutes=10), end)
    # The first update after a nightly model (data end a day back) reads the last hour only.
    later = data_end + timedelta(hours=24)
    assert update_model.update_window(data_end, later, 10, 60) == (later - timedelta(hours=1), later)
    assert update_model.update_window(data_end, end, 10, 60) == (data_end - timedelta(minutes=10), end)
    with pytest.raises(update_model.UpdateRefusedError, match="not after the live model's data end"):
        update_model.update_window(data_end, data_end, 10)


def test_a_warm_start_learns_a_new_pair_and_a_new_item_and_leaves_unseen_items_alone() -> None:
    rng = np.random.default_rng(0)
    base = _views([(f"u{u}", f"i{rng.integers(60)}", 60 * n) for u in range(300) for n in range(20)])
    # The production settings (conf/carousel.yaml): no subsampling, batches of 1024.
    settings = {"embedding_dim": 16, "batch_size": 1024, "subsample": 0, "learning_rate": 0.01}
    live = NextItem2Vec(None, epochs=3, **settings).fit(base)
    before = live.recommend(5)
    # A pair the live model does not make: i3 and the first item outside its list.
    listed = before[before["item_id"] == "i3"]["rec_item_id"].tolist()
    target = next(f"i{n}" for n in range(4, 50) if f"i{n}" not in listed)

    later = 10**7
    planted = [(f"p{u}", item, later + step) for u in range(200) for step, item in enumerate(("i3", target))]
    planted += [(f"n{u}", item, later + step) for u in range(200) for step, item in enumerate(("NEW", "i5"))]
    # Background traffic on items i0..i49 only: i50..i59 see nothing new.
    background = [(f"v{u}", f"i{rng.integers(50)}", later + 60 * n) for u in range(50) for n in range(10)]
    warm = WarmStart(
        live.item_ids,
        live.embeddings,
        live.output_embeddings,
        live.token_counts,
        {**live.fit_params, "epochs": 5},
    )
    updated = NextItem2Vec(None, warm_start=warm, **settings).fit(_views(planted + background))
    after = updated.recommend(5)

    assert updated.item_ids.tolist() == sorted([*live.item_ids.tolist(), "NEW"])
    assert target in after[after["item_id"] == "i3"]["rec_item_id"].tolist()
    assert "i5" in after[after["item_id"] == "NEW"]["rec_item_id"].tolist()
    # Token counts add up: what the live model counted plus the new sequences' tokens.
    old_rows = np.searchsorted(updated.item_ids, live.item_ids)
    expected = np.bincount(updated.sequences.codes, minlength=len(updated.item_ids)).astype(float)
    expected[old_rows] += live.token_counts
    np.testing.assert_array_equal(updated.token_counts, expected)
    # Lazy Adam touches only the rows of a batch: the input vectors of items absent from the new
    # interactions are the live model's, exactly.
    unseen = [f"i{n}" for n in range(50, 60)]
    live_rows = np.searchsorted(live.item_ids, unseen)
    updated_rows = np.searchsorted(updated.item_ids, unseen)
    np.testing.assert_array_equal(updated.embeddings[updated_rows], live.embeddings[live_rows])
    assert updated.metadata()["warm_start"] is True

    # With the live model's data end inside the interactions (a context overlap), the tokens up to
    # it are trained on again but not counted again: only those after it add to the counts.
    data_end = pd.Timestamp(later + 30, unit="s", tz="UTC")  # after the planted views
    overlap = NextItem2Vec(None, warm_start=replace(warm, data_end=data_end), **settings)
    overlap.fit(_views(planted + background))
    frame = _views(planted + background)
    newer = user_sequences(frame[frame["event_time"] > data_end], known_items=overlap.item_ids)
    expected = np.bincount(newer.codes, minlength=len(overlap.item_ids)).astype(float)
    expected[old_rows] += live.token_counts
    np.testing.assert_array_equal(overlap.token_counts, expected)
    assert overlap.token_counts[list(overlap.item_ids).index("NEW")] == 0


def test_pruning_keeps_the_newest_update_outputs_and_the_live_one(tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"training.workspace={tmp_path}"])
    root = Path(update_model.updates_root(cfg))
    versions = [f"next-item2vec-20261204T0{hour}0000Z-abc" for hour in range(1, 7)]
    for version in versions:
        (root / version / "recommendations").mkdir(parents=True)
        (root / version / "metadata.json").write_text("{}")
        (root / version / "recommendations" / "part-00000.csv").write_text("item_id\n")
    live = str(root / versions[1])

    deleted = update_model.prune_updates(cfg, keep=3, protect=live)

    assert sorted(Path(folder).name for folder in deleted) == [versions[0], versions[2]]
    assert sorted(p.name for p in root.iterdir()) == [versions[1], *versions[3:]]
    assert update_model.prune_updates(cfg, keep=3, protect=live) == []  # nothing more to do


def test_a_warm_start_refuses_tables_that_do_not_fit_its_vocabulary() -> None:
    with pytest.raises(ValueError, match="3 items, but tables of 2 and 3 rows"):
        WarmStart(
            np.array(["a", "b", "c"], dtype=object),
            np.zeros((2, 5), np.float32),
            np.zeros((3, 5), np.float32),
            np.ones(3),
            {"epochs": 1, "sampled_negatives": 8, "cosine_blend": 0.0},
        )


# ---------------------------------------------------------------------------------------------
# End to end: nightly -> new events -> update-model on real Delta tables
# ---------------------------------------------------------------------------------------------
def _config(root: Path, *extra: str):
    return load_config(
        overrides=[
            f"storage.root={root}/data",
            f"training.workspace={root}/training",
            "training.min_interactions=3000",
            "training.lookback_days=12",
            "training.top_k=5",
            "training.model.embedding_dim=16",
            "training.model.epochs=2",
            # A nightly model of these 2 passes, not as many as a validation split would choose:
            # weak enough that one update's planted pattern shows in its lists.
            "training.model.validation_share=0",
            # The nightly model fits on everything: its data end is the newest simulated event.
            "training.gate.holdout_hours=0",
            # Small data: few optimiser steps per pass, so more passes at the nightly's rate.
            "training.online.epochs=10",
            "training.online.learning_rate=0.01",
            "training.online.min_interactions=100",
            "training.online.holdout_minutes=0",
            "simulator.users=300",
            "simulator.items=60",
            "simulator.days=12",
            *extra,
        ]
    )


def _lists(spark, cfg) -> dict[str, list[str]]:
    live = spark.read.format("delta").load(cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE))
    rows = live.orderBy("item_id", "rank").select("item_id", "rec_item_id").collect()
    lists: dict[str, list[str]] = {}
    for row in rows:
        lists.setdefault(row.item_id, []).append(row.rec_item_id)
    return lists


def _live_versions(spark, cfg) -> set[str]:
    live = spark.read.format("delta").load(cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE))
    return {row.model_version for row in live.select("model_version").distinct().collect()}


def _planted_views(start: datetime, pairs: list[tuple[str, str]], users: int) -> list[tuple[bytes, bytes]]:
    """Each of ``users`` new users views the pair's first item, then its second, a minute apart."""
    records = []
    for p, (first, second) in enumerate(pairs):
        for u in range(users):
            user = f"planted-{p}-{u}"
            for step, item in enumerate((first, second)):
                at = start + timedelta(seconds=7 * u, minutes=step)
                fields = {
                    "event_id": f"planted-{p}-{u}-{step}",
                    "user_id": user,
                    "event_type": "Product Viewed",
                    "event_time": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    "source": "web",
                    "item_id": item,
                }
                records.append((user.encode(), event_json(**fields)))
    return records


@pytest.mark.integration
def test_update_model_publishes_a_pattern_and_a_product_that_appeared_after_the_live_model(spark, tmp_path):
    cfg = _config(tmp_path)
    world = sim.build_world(cfg.simulator)
    records = [(r.key, r.value) for r in sim.stream_records(world, cfg.simulator, 12000, END, seed=3)]
    store_event_records(spark, cfg, records, END)
    nightly_run = nightly.run(spark, cfg, end=END + timedelta(seconds=1))
    live_lists = _lists(spark, cfg)

    # Nothing new yet: the update skips, no version is written.
    table = DeltaTable.forPath(spark, cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE))
    version_before = table.history(1).first()["version"]
    skipped = update_model.run(spark, cfg, end=END + timedelta(minutes=30))
    assert "fewer than training.online.min_interactions=100" in skipped["skipped"]
    assert table.history(1).first()["version"] == version_before

    # After the live model: a co-view pattern between two items it does not pair, and a new product.
    first = sorted(live_lists)[0]
    second = next(
        item for item in sorted(live_lists, reverse=True) if item not in live_lists[first] + [first]
    )
    popular = live_lists[first][0]
    store_event_records(
        spark,
        cfg,
        _planted_views(END + timedelta(minutes=5), [(first, second), ("brand-new", popular)], 120),
        END + timedelta(minutes=30),  # received after they happened
    )
    summary = update_model.run(spark, cfg, end=END + timedelta(hours=1))

    assert summary["live_model_version"] == nightly_run["model_version"]
    assert summary["new_interactions"] == 480 and summary["new_items"] == 1
    assert _live_versions(spark, cfg) == {summary["model_version"]}
    lists = _lists(spark, cfg)
    assert second in lists[first]
    assert popular in lists["brand-new"]
    assert set(live_lists) < set(lists)  # every earlier item keeps a list
    metadata = json.loads(Path(summary["model_output"], "metadata.json").read_text())
    assert metadata["update"]["parent_model_version"] == nightly_run["model_version"]
    assert metadata["data_end"] > _data_end(nightly_run)
    # The publish went through the gate and its log, and records where the update came from.
    logged = (
        spark.read.format("delta")
        .load(cfg.storage.table(MODEL_PUBLISH_LOG_TABLE))
        .where(F.col("model_version") == summary["model_version"])
        .select("decision")
        .collect()
    )
    assert [row.decision for row in logged] == ["unjudged"]
    commit = json.loads(table.history(1).first()["userMetadata"])
    assert Path(commit["model_output"]).resolve() == Path(summary["model_output"]).resolve()

    # A live output without the tables a warm start needs is refused, naming the file.
    Path(summary["model_output"], "token_counts.npy").unlink()
    with pytest.raises(update_model.UpdateRefusedError, match=r"has no token_counts\.npy"):
        update_model.run(spark, cfg, end=END + timedelta(hours=2))


def _data_end(summary: dict) -> str:
    return json.loads(Path(summary["model_output"], "metadata.json").read_text())["data_end"]
