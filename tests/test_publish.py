"""Publishing the correlation matrix: validation gate, new Delta versions, rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyspark.sql import Row
from pyspark.testing import assertDataFrameEqual

from carousel.config import load_config
from carousel.schemas import ITEM_RECOMMENDATIONS_TABLE
from jobs import publish_recommendations as pub

ITEMS = ["a", "b", "c"]


def _write_output(root: Path, version: str, rows: list[tuple], top_k: int = 2, items=ITEMS) -> str:
    (root / "recommendations").mkdir(parents=True)
    lines = ["item_id,rank,rec_item_id,score"] + [",".join(str(v) for v in row) for row in rows]
    (root / "recommendations" / "part-0.csv").write_text("\n".join(lines) + "\n")
    (root / "metadata.json").write_text(
        json.dumps({"model_version": version, "top_k": top_k, "items": items})
    )
    return str(root)


GOOD = [("a", 1, "b", 0.9), ("a", 2, "c", 0.5), ("b", 1, "a", 0.9), ("b", 2, "c", 0.4),
        ("c", 1, "a", 0.5), ("c", 2, "b", 0.4)]  # fmt: skip


@pytest.fixture
def cfg(tmp_path):
    return load_config(overrides=[f"storage.root={tmp_path}/data"])


def _live(spark, cfg):
    return spark.read.format("delta").load(cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE))


def test_publish_then_refuse_bad_outputs_then_roll_back(spark, cfg, tmp_path):
    v1 = pub.run(spark, cfg, _write_output(tmp_path / "m1", "m1", GOOD))
    assertDataFrameEqual(
        _live(spark, cfg),
        [Row(item_id=i, rank=r, rec_item_id=x, score=s, model_version="m1") for i, r, x, s in GOOD],
    )
    second = [(i, r, x, s / 2) for i, r, x, s in GOOD]
    v2 = pub.run(spark, cfg, _write_output(tmp_path / "m2", "m2", second))
    assert v2 > v1
    assert {r.model_version for r in _live(spark, cfg).collect()} == {"m2"}

    bad_outputs = {
        "self": ([("a", 1, "a", 0.9), *GOOD[1:]], "self-recommendations"),
        "nan": ([("a", 1, "b", "NaN"), *GOOD[1:]], "non-finite"),
        "unknown": ([("a", 1, "zz", 0.9), *GOOD[1:]], "unknown items"),
        "short": (GOOD[:-1], "without exactly 2"),
        "empty": ([], "empty result"),
    }
    for name, (rows, reason) in bad_outputs.items():
        with pytest.raises(pub.PublishRefusedError, match=reason):
            pub.run(spark, cfg, _write_output(tmp_path / f"bad-{name}", f"bad-{name}", rows))
        assert {r.model_version for r in _live(spark, cfg).collect()} == {"m2"}, name

    restored = pub.rollback(spark, cfg)
    assert restored == v1
    assert {r.model_version for r in _live(spark, cfg).collect()} == {"m1"}
    assert pub.main(["--input", str(tmp_path / "bad-self"), "--set", f"storage.root={cfg.storage.root}"]) == 1
