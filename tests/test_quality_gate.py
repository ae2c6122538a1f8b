"""The quality gate of publish: a candidate worse than the live model is refused, --force records it.

Unit tests cover the pure parts (the hold-out split of train, the window, the judgement); the
integration test trains real models on a simulated world and publishes them into a real Delta
table, one of them trained on shuffled sequences.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from delta.tables import DeltaTable
from pyspark.sql import Row
from pyspark.testing import assertDataFrameEqual

from carousel.config import load_config
from carousel.schemas import ITEM_RECOMMENDATIONS_TABLE, MODEL_PUBLISH_LOG_TABLE
from jobs import publish_recommendations as pub
from jobs import simulate_events as sim
from jobs import train
from models.interactions import read_interactions

END = datetime(2026, 11, 30, 12, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------
def _interactions(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    lines = ["user_id,item_id,event_type,event_time", *(f"{u},{i},Product Viewed,{t}" for u, i, t in rows)]
    return read_interactions(io.StringIO("\n".join(lines) + "\n"))


def test_split_holdout_keeps_the_newest_hours_out_of_the_fit() -> None:
    frame = _interactions(
        [
            ("u1", "a", "2026-11-28T10:00:00Z"),
            ("u1", "b", "2026-11-28T11:00:00Z"),
            ("u2", "a", "2026-11-29T09:00:00Z"),
            ("u2", "c", "2026-11-29T12:00:00Z"),
            ("u3", "z", "2026-11-30T11:00:00Z"),  # z appears only in the held-back window
        ]
    )
    split = train.split_holdout(frame, hours=24)
    assert split.fit["item_id"].astype(str).tolist() == ["a", "b", "a"]
    assert split.holdout is not None and split.holdout["item_id"].astype(str).tolist() == ["c", "z"]
    # An item seen only after the window's start must not enter the fitted vocabulary.
    assert set(split.fit["item_id"].cat.categories) == {"a", "b"}
    assert split.info == {
        "start": "2026-11-29T11:00:00Z",
        "end": "2026-11-30T11:00:00Z",
        "rows": 2,
        "hours": 24,
    }

    assert train.split_holdout(frame, hours=0).holdout is None
    too_much = train.split_holdout(frame, hours=30)  # 3 of 5 interactions: more than half
    assert (
        too_much.holdout is None and len(too_much.fit) == 5 and "more than half" in too_much.info["skipped"]
    )


def test_gate_window_drops_what_the_live_model_was_fitted_on() -> None:
    holdout = _interactions([("u1", "a", "2026-11-29T10:00:00Z"), ("u1", "b", "2026-11-29T14:00:00Z")])
    window = pub.gate_window(holdout, datetime(2026, 11, 29, 12, tzinfo=UTC))
    assert window["item_id"].astype(str).tolist() == ["b"]
    assert len(pub.gate_window(holdout, None)) == 2


GATE = load_config().training.gate.model_copy(update={"max_drop": 0.02, "min_pairs": 10})
LIVE = {"recall@k": 0.50, "mrr@k": 0.20}


@pytest.mark.parametrize(
    ("candidate", "pairs", "force", "decision", "reason"),
    [
        ({"recall@k": 0.50, "mrr@k": 0.20}, 100, False, "passed", "Recall@20 0.5000 vs live 0.5000"),
        ({"recall@k": 0.491, "mrr@k": 0.197}, 100, False, "passed", "on 100 pairs"),  # within 2 %
        ({"recall@k": 0.489, "mrr@k": 0.25}, 100, False, "refused", "Recall@20 0.4890 < 0.4900"),
        ({"recall@k": 0.60, "mrr@k": 0.10}, 100, False, "refused", "MRR@20 0.1000 < 0.1960"),
        ({"recall@k": 0.40, "mrr@k": 0.10}, 100, True, "forced", "--force: Recall@20"),
        ({"recall@k": 0.0, "mrr@k": 0.0}, 9, False, "unjudged", "9 next-item pairs"),
    ],
)
def test_judge(candidate: dict, pairs: int, force: bool, decision: str, reason: str) -> None:
    got_decision, got_reason = pub.judge(candidate, LIVE, pairs, 20, GATE, force)
    assert got_decision == decision
    assert reason in got_reason


# ---------------------------------------------------------------------------------------------
# End to end: train -> publish on real Delta tables
# ---------------------------------------------------------------------------------------------
def _config(root: Path, *extra: str):
    return load_config(
        overrides=[
            f"storage.root={root}/data",
            f"training.workspace={root}/training",
            "training.top_k=5",
            "training.model.embedding_dim=16",
            "training.model.epochs=3",
            "training.gate.holdout_hours=48",
            "training.gate.min_pairs=100",
            "evaluation.k=5",
            "simulator.users=300",
            "simulator.items=60",
            "simulator.days=12",
            *extra,
        ]
    )


def _write_csv(frame: pd.DataFrame, path: Path) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def _log(spark, cfg):
    return spark.read.format("delta").load(cfg.storage.table(MODEL_PUBLISH_LOG_TABLE))


def _live_models(spark, cfg) -> set[str]:
    live = spark.read.format("delta").load(cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE))
    return {r.model_version for r in live.select("model_version").distinct().collect()}


@pytest.mark.integration
def test_the_gate_refuses_a_model_trained_on_shuffled_sequences(spark, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    world = sim.build_world(cfg.simulator)
    clicks = pd.DataFrame(sim.interaction_rows(world, cfg.simulator, 9000, END, seed=11))
    good_csv = _write_csv(clicks, tmp_path / "clicks.csv")
    # The same clicks, items shuffled across the rows the model fits on (the held-back window
    # stays real, so both models are judged on the same true next-item pairs).
    times = pd.to_datetime(clicks["event_time"], utc=True)
    fitted = (times <= times.max() - timedelta(hours=48)).to_numpy()
    shuffled = clicks.copy()
    shuffled.loc[fitted, "item_id"] = np.random.default_rng(5).permutation(
        clicks.loc[fitted, "item_id"].to_numpy()
    )
    bad_csv = _write_csv(shuffled, tmp_path / "shuffled.csv")

    good = train.run(cfg, good_csv, output=str(tmp_path / "models/good"))
    assert good["holdout"]["rows"] > 0 and good["data_end"] < good["holdout"]["end"]
    first_version = pub.run(spark, cfg, good["output"])

    bad = train.run(cfg, bad_csv, output=str(tmp_path / "models/bad"))
    with pytest.raises(pub.GateRefusedError, match="refused by the quality gate") as refused:
        pub.run(spark, cfg, bad["output"])
    assert "--force" in str(refused.value)
    assert _live_models(spark, cfg) == {good["model_version"]}
    table = DeltaTable.forPath(spark, cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE))
    assert table.history(1).first()["version"] == first_version  # nothing written

    # A candidate as good as the live model passes (trained again on the same data: seeded, so
    # the same lists and the same metrics).
    again = train.run(cfg, good_csv, output=str(tmp_path / "models/again"))
    passed_version = pub.run(spark, cfg, again["output"])

    # The CLI refuses with exit status 1; --force publishes the worse model and says so.
    settings = ["--set", f"storage.root={cfg.storage.root}", "--set", "evaluation.k=5",
                "--set", "training.gate.min_pairs=100"]  # fmt: skip
    assert pub.main(["--input", bad["output"], *settings]) == 1
    assert _live_models(spark, cfg) == {again["model_version"]}
    assert pub.main(["--input", bad["output"], "--force", *settings]) == 0
    assert _live_models(spark, cfg) == {bad["model_version"]}
    forced_commit = table.history(1).first()
    assert json.loads(forced_commit["userMetadata"])["gate"] == "forced"

    attempts = _log(spark, cfg).orderBy("attempted_at")
    assertDataFrameEqual(
        attempts.select("model_version", "decision", "forced", "live_model_version", "table_version"),
        [
            Row(model_version=good["model_version"], decision="first", forced=False, live_model_version=None,
                table_version=first_version),
            Row(model_version=bad["model_version"], decision="refused", forced=False,
                live_model_version=good["model_version"], table_version=None),
            Row(model_version=again["model_version"], decision="passed", forced=False,
                live_model_version=good["model_version"], table_version=passed_version),
            Row(model_version=bad["model_version"], decision="refused", forced=False,
                live_model_version=again["model_version"], table_version=None),
            Row(model_version=bad["model_version"], decision="forced", forced=True,
                live_model_version=again["model_version"], table_version=forced_commit["version"]),
        ],
        checkRowOrder=True,
    )  # fmt: skip
    refusal = attempts.where("decision = 'refused'").first()
    # The evidence: the same pairs for both, the candidate far below the live model.
    assert refusal.pairs >= 100 and refusal.k == 5
    assert refusal.candidate_recall < refusal.live_recall * 0.98
    assert refusal.window_start is not None and refusal.window_end > refusal.window_start


def _output(root: Path, version: str, **metadata: object) -> str:
    """A minimal train output: a 3-item matrix (every item lists the other two), and ``metadata``."""
    lists = {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}
    (root / "recommendations").mkdir(parents=True)
    rows = [f"{i},{r},{x},{1.0 / r}" for i, recs in lists.items() for r, x in enumerate(recs, 1)]
    (root / "recommendations" / "part-0.csv").write_text("item_id,rank,rec_item_id,score\n" + "\n".join(rows))
    holdout = metadata.pop("holdout_rows", None)
    if holdout is not None:
        (root / "holdout").mkdir()
        lines = [
            "user_id,item_id,event_type,event_time",
            *(f"{u},{i},Product Viewed,{t}" for u, i, t in holdout),
        ]
        (root / "holdout" / "part-0.csv").write_text("\n".join(lines) + "\n")
        metadata["holdout"] = {"path": "holdout/"}
    (root / "metadata.json").write_text(
        json.dumps({"model_version": version, "top_k": 2, "items": sorted(lists), **metadata})
    )
    return str(root)


@pytest.mark.integration
def test_the_gate_refuses_an_older_candidate_and_a_bad_data_end(spark, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    # Published without a data end (before the gate): its publish time stands in for it.
    pub.run(spark, cfg, _output(tmp_path / "m1", "m1"))
    # A candidate whose held-back window ended long before that: the live model may have seen it.
    old = [("u1", "a", "2020-01-01T10:00:00Z"), ("u1", "b", "2020-01-01T11:00:00Z")]
    stale = _output(tmp_path / "m0", "m0", data_end="2019-12-31T00:00:00Z", holdout_rows=old)
    with pytest.raises(pub.GateRefusedError, match="fitted on data up to .* an older model"):
        pub.run(spark, cfg, stale)
    assert _live_models(spark, cfg) == {"m1"}
    assert pub.run(spark, cfg, stale, force=True) >= 0
    assert _live_models(spark, cfg) == {"m0"}
    # A data end that is not a time is refused before anything is judged, naming it.
    bad = _output(tmp_path / "m2", "m2", data_end="yesterday")
    with pytest.raises(pub.PublishRefusedError, match="data_end 'yesterday' is not an ISO-8601 time"):
        pub.run(spark, cfg, bad)
    decisions = [r.decision for r in _log(spark, cfg).orderBy("attempted_at").collect()]
    assert decisions == ["first", "stale", "forced"]
