"""New products: content neighbours from the catalog, and exploration slots marked new_item."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.testing import assertDataFrameEqual
from test_ranking import REQUEST_DDL, campaign, catalog, matrix

from carousel.config import load_config
from carousel.content import content_neighbours, product_terms, tfidf_matrix
from carousel.ranking import (
    CONTENT_LISTS_VERSION,
    FILTER_COLUMNS,
    RANKED_DDL,
    FallbackLists,
    RankingRules,
    item_lists,
    rank_recommendations,
    rank_request,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SERVING = load_config().serving
OFF = load_config(overrides=["serving.cold_start.content_neighbours=0"]).serving

# (item_id, title, category, price, brand, active); the model knows a, b, c, d.
PRODUCTS = [
    ("a", "Trail running shoe", "shoes", 80.0, "acme", True),
    ("b", "Road running shoe", "shoes", 90.0, "acme", True),
    ("c", "Leather boot", "shoes", 120.0, "zeta", True),
    ("d", "Canvas tote bag", "bags", 30.0, "zeta", True),
    ("n1", "Trail running shoe GTX", "shoes", 85.0, "acme", True),  # new: like a
    ("n2", "Canvas weekend bag", "bags", 35.0, "zeta", True),  # new: like d, another category than a
    ("n3", "Trail running shoe old", "shoes", 80.0, "acme", False),  # new but inactive
]


def _catalog_rows() -> list[dict]:
    return [
        {"item_id": i, "title": t, "description": None, "category": c, "price": p, "properties": {"brand": b},
         "active": active}
        for i, t, c, p, b, active in PRODUCTS
    ]  # fmt: skip


def test_product_terms_keep_fields_apart() -> None:
    terms = product_terms({"title": "Trail-running shoe", "category": "Shoes", "price": 80.0,
                           "properties": {"brand": "ACME", "size": "42"}})  # fmt: skip
    assert terms == ["trail", "running", "shoe", "category:shoes", "brand:acme", "price:6"]


def test_content_neighbours_rank_by_tfidf_cosine() -> None:
    rows = _catalog_rows()
    products = pa.Table.from_pylist(rows)
    vectors = tfidf_matrix(products)
    norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(axis=1)).ravel())
    assert np.allclose(norms, 1.0)
    active = np.array([r["active"] for r in rows])
    query, neighbour, cosine = content_neighbours(vectors, [4], active, k=3)  # n1
    ids = [rows[i]["item_id"] for i in neighbour]
    assert query.tolist() == [4, 4, 4]
    assert ids[0] == "a"  # same words, category, brand and price band
    assert "n3" not in ids and "n1" not in ids  # inactive, itself
    assert list(cosine) == sorted(cosine, reverse=True) and cosine[0] > cosine[-1] > 0


def _lists(spark: SparkSession, serving=SERVING):
    frame = catalog(spark, [(i, c, True, p, 4.0, active, b) for i, _, c, p, b, active in PRODUCTS])
    titles = spark.createDataFrame([(i, t) for i, t, *_ in PRODUCTS], "item_id string, title string")
    frame = frame.drop("title").join(titles, "item_id")
    model = matrix(
        spark, {"a": [("b", 0.9), ("c", 0.5)], "b": [("a", 0.9)], "c": [("a", 0.4)], "d": [("c", 0.1)]}
    )
    camp = campaign(items=5, filters={"in_stock_only": False})
    return frame, model, camp, item_lists(model, frame, camp.filters, serving.cold_start)


def test_a_new_product_gets_a_content_list_and_is_explored_from_its_kind(spark: SparkSession) -> None:
    _, _, _, lists = _lists(spark)
    index = lists.index
    # n1's own list: its content neighbours, labelled as such.
    own = lists.candidates(index["n1"])
    assert own[0][0] == "a" and own[0][1] == 1.0
    assert {version for _, _, version in own} == {CONTENT_LISTS_VERSION}
    # Known products keep their model lists; the inactive n3 gets none.
    assert lists.candidates(index["a"]) == (("b", 1.0, "m1"), ("c", 0.0, "m1"))
    assert lists.candidates(index["n3"]) == ()
    # Exploration: from a to n1 (same category), from d to n2; never across categories.
    assert [item for item, _ in lists.explorations(index["a"])] == ["n1"]
    assert [item for item, _ in lists.explorations(index["d"])] == ["n2"]
    assert all(item != "n2" for item, _ in lists.explorations(index["a"]))


def test_exploration_slots_go_to_new_products_marked_new_item(spark: SparkSession) -> None:
    _, _, camp, lists = _lists(spark)
    rules = RankingRules.of(camp, SERVING)
    assert rules.exploration_slots == 1  # 0.2 x 5 slots
    request = {"request_id": "r", "user_id": "u", "requested_at": None, "trigger_item_id": None,
               "recent_views": [{"item_id": "a", "event_time": None}], "recent_purchases": []}  # fmt: skip
    ranked = rank_request(request, lists, FallbackLists(), rules)
    assert [(item, strategy) for item, _, _, strategy, _ in ranked] == [
        ("b", "model"),
        ("c", "model"),
        ("n1", "new_item"),
    ]
    # A user who viewed the new product gets its content neighbours as model candidates.
    viewer = {**request, "recent_views": [{"item_id": "n1", "event_time": None}]}
    first = rank_request(viewer, lists, FallbackLists(), rules)[0]
    assert (first[0], first[3], first[4]) == ("a", "model", CONTENT_LISTS_VERSION)
    # Off: no content lists, no exploration.
    _, _, _, plain = _lists(spark, OFF)
    off_rules = RankingRules.of(camp, OFF)
    assert off_rules.exploration_slots == 0 and not plain.explores
    assert [i for i, *_ in rank_request(request, plain, FallbackLists(), off_rules)] == ["b", "c"]
    assert rank_request(viewer, plain, FallbackLists(), off_rules) == []


def test_campaign_requests_explore_new_products(spark: SparkSession) -> None:
    frame, model, camp, _ = _lists(spark)
    requests = spark.createDataFrame([("r1", "u1", NOW, "a", [], [])], REQUEST_DDL)
    result = rank_recommendations(
        requests,
        matrix=model,
        catalog=frame.select("item_id", *FILTER_COLUMNS),
        trending=spark.createDataFrame([], "item_id string, category string, score double"),
        sent=None,
        campaign=camp,
        serving=SERVING,
    )
    expected: DataFrame = spark.createDataFrame(
        [("r1", "b", 1, 1.0, "model", "m1"), ("r1", "c", 2, 0.0, "model", "m1")], RANKED_DDL
    )
    assertDataFrameEqual(result.where("strategy = 'model'"), expected)
    explored = result.where("strategy = 'new_item'").collect()
    assert [(r.item_id, r.rank, r.model_version) for r in explored] == [("n1", 3, None)]


def test_exploration_draws_spread_over_the_new_products_and_repeat_per_request(spark: SparkSession) -> None:
    rows = [
        ("a", "shoes", True, 80.0, 4.0, True, "acme"),
        ("b", "shoes", True, 90.0, 4.0, True, "acme"),
        *[(f"n{i}", "shoes", True, 80.0, 4.0, True, "acme") for i in range(1, 4)],
    ]
    frame = catalog(spark, rows)
    model = matrix(spark, {"a": [("b", 0.9)], "b": [("a", 0.9)]})
    camp = campaign(items=5, filters={"in_stock_only": False})
    lists = item_lists(model, frame, camp.filters, SERVING.cold_start)
    rules = RankingRules.of(camp, SERVING)
    assert sorted(item for item, _ in lists.explorations(lists.index["a"])) == ["n1", "n2", "n3"]

    def explored(request_id: str) -> list[str]:
        request = {"request_id": request_id, "user_id": "u", "requested_at": None, "trigger_item_id": "a",
                   "recent_views": [], "recent_purchases": []}  # fmt: skip
        return [
            i
            for i, _, _, strategy, _ in rank_request(request, lists, FallbackLists(), rules)
            if strategy == "new_item"
        ]

    draws = [explored(f"r{n}") for n in range(300)]
    assert all(len(d) == 1 for d in draws)
    # Equally similar: each gets a fair share of the requests, not the first one every time.
    counts = {item: sum(d == [item] for d in draws) for item in ("n1", "n2", "n3")}
    assert all(60 <= c <= 140 for c in counts.values()), counts
    assert explored("r7") == draws[7]  # a replay draws the same
