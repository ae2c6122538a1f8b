"""Unit tests of the item-to-item models (``models/``): fast, in memory, no Spark, no Kafka.

Small inline frames check the data handling and the arithmetic of each model; a small simulator
world (200 items in planted clusters of 5) checks the shared interface of every model and that
the models recover the planted neighbours.
"""

from __future__ import annotations

import io
import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from carousel.config import ModelConfig, SimulatorConfig, load_config
from carousel.schemas import PRODUCT_VIEWED, RECOMMENDATION_COLUMNS
from jobs.evaluate import ranking_metrics
from jobs.simulate_events import build_world, interaction_rows
from models import MODELS, build_model
from models.base import NotFittedError
from models.baselines import ItemKNN, LLRCooccurrence, Popularity, SequentialRules, log_likelihood_ratio
from models.interactions import read_interactions, time_split, to_csv_text, user_item_matrix, user_sequences
from models.item2vec import Item2Vec, skipgram_pairs, subsample_keep_probability, unigram_table
from models.next_item2vec import (
    LARGE_DATA_KEYS,
    NextItem2Vec,
    chosen_pass,
    effective_params,
    forward_pairs,
    next_item_metrics,
    popularity_prior,
    should_stop,
    validation_split,
)
from models.sampled_softmax import SampledSoftmaxTrainer, unique_rows
from models.topk import to_recommendations, top_k_blended, top_k_scores, top_k_similar, top_k_sparse

SMALL = ModelConfig(
    embedding_dim=16,
    window=3,
    negatives=5,
    epochs=4,
    batch_size=256,
    learning_rate=0.01,
    min_item_count=1,
    subsample=0.001,
    seed=7,
)
END = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


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


@pytest.fixture(scope="module")
def world_data() -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """~25k item interactions of a 200-item world with planted clusters of 5, and the clusters."""
    cfg = SimulatorConfig(
        users=1000,
        items=200,
        categories=6,
        cluster_size=5,
        events=30000,
        days=5,
        rate=0,
        seed=3,
        bad_share=0,
        duplicate_share=0,
    )
    world = build_world(cfg)
    df = pd.DataFrame(interaction_rows(world, cfg, 30000, END, 3))
    df["event_time"] = pd.to_datetime(df["event_time"], utc=True, format="ISO8601")
    return df, world.planted_neighbours()


def planted_recall(recs: pd.DataFrame, planted: dict[str, list[str]], k: int = 5) -> float:
    """Share of the top-k recommendations that lie in the item's planted cluster."""
    top = recs[recs["rank"] <= k]
    hits = [rec in planted[item] for item, rec in zip(top["item_id"], top["rec_item_id"], strict=True)]
    return float(np.mean(hits))


def check_recommendations(recs: pd.DataFrame, k: int, item_ids: np.ndarray, exact_k: bool) -> None:
    """The invariants every model's output must satisfy."""
    assert list(recs.columns) == list(RECOMMENDATION_COLUMNS)
    assert len(recs) > 0
    assert (recs["item_id"] != recs["rec_item_id"]).all(), "an item recommends itself"
    assert np.isfinite(recs["score"].to_numpy()).all()
    assert set(recs["item_id"]) <= set(item_ids) and set(recs["rec_item_id"]) <= set(item_ids)
    assert not recs.duplicated(["item_id", "rec_item_id"]).any()
    for _, group in recs.groupby("item_id", sort=False):
        ranks = group["rank"].to_numpy()
        assert list(ranks) == list(range(1, len(ranks) + 1))
        assert len(ranks) <= k
        if exact_k:
            assert len(ranks) == k
        assert (np.diff(group["score"].to_numpy()) <= 0).all(), "scores must not increase with the rank"


# ---------------------------------------------------------------------------------------------
# Interactions
# ---------------------------------------------------------------------------------------------
def test_read_interactions_round_trip() -> None:
    text = (
        "user_id,item_id,event_type,event_time\n"
        "u-1,i-1,Product Viewed,2026-11-29T03:00:00.123Z\n"
        "u-1,i-2,Added To Cart,2026-11-29T04:00:00+01:00\n"
        "u-2,i-1,Product Purchased,2026-11-29T05:00:00\n"
    )
    df = read_interactions(io.StringIO(text))
    assert list(df.columns) == ["user_id", "item_id", "event_type", "event_time"]
    assert str(df["event_time"].dtype) == "datetime64[ns, UTC]"
    assert isinstance(df["user_id"].dtype, pd.CategoricalDtype)
    assert df["event_time"].iloc[1] == pd.Timestamp("2026-11-29T03:00:00Z")
    assert df["event_time"].iloc[2] == pd.Timestamp("2026-11-29T05:00:00Z")
    again = read_interactions(io.StringIO(to_csv_text(df)))
    pd.testing.assert_series_equal(again["event_time"], df["event_time"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "user,item_id,event_type,event_time\nu,i,Product Viewed,2026-11-29T03:00:00Z\n",
            "line 1: bad header",
        ),
        ("item_id,user_id,event_type,event_time\n", "line 1: bad header"),
        ("", "line 1: empty file"),
        (
            "user_id,item_id,event_type,event_time\nu,i,Product Viewed,2026-11-29T03:00:00Z\n"
            "u,i,Product Viewed,yesterday\n",
            "line 3, column event_time: unparseable ISO-8601 time 'yesterday'",
        ),
        (
            "user_id,item_id,event_type,event_time\nu,i,Product Viewed,2026-11-29T03:00:00Z\n"
            "u,,Product Viewed,2026-11-29T03:00:00Z\n",
            "line 3, column item_id: missing value",
        ),
    ],
)
def test_read_interactions_errors_name_line_and_column(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_interactions(io.StringIO(text))


def test_user_sequences_orders_collapses_and_filters() -> None:
    df = frame(
        [
            ("u2", "b", "2026-01-01T00:00:03Z"),
            ("u1", "b", "2026-01-01T00:00:02Z"),
            ("u1", "a", "2026-01-01T00:00:01Z"),
            ("u1", "b", "2026-01-01T00:00:02.5Z"),  # a repeat of b: collapsed
            ("u1", "c", "2026-01-01T00:00:04Z"),
            ("u2", "a", "2026-01-01T00:00:01Z"),
            ("u3", "z", "2026-01-01T00:00:01Z"),  # z has one interaction: dropped with min count 2
        ]
    )
    seq = user_sequences(df, min_item_count=2)
    assert list(seq.items) == ["a", "b"]  # c (1 interaction) and z dropped
    assert list(seq.counts) == [2, 3]
    assert list(seq.users) == ["u1", "u2"]  # u3 has nothing left
    assert [list(seq.items[s]) for s in seq.split()] == [["a", "b"], ["a", "b"]]
    everything = user_sequences(df)
    assert [list(everything.items[s]) for s in everything.split()] == [["a", "b", "c"], ["a", "b"], ["z"]]
    assert list(everything.offsets) == [0, 3, 5, 6]
    recent = user_sequences(df, max_length=2)
    assert [list(recent.items[s]) for s in recent.split()] == [["b", "c"], ["a", "b"], ["z"]]


def test_user_item_matrix_caps_items_per_user() -> None:
    df = frame([("u1", f"i{n}", f"2026-01-01T00:00:0{n}Z") for n in range(5)] + [("u2", "i0", "2026-01-01")])
    seq = user_sequences(df)
    full = user_item_matrix(seq).toarray()
    assert full.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    capped = user_item_matrix(seq, max_items_per_user=2).toarray()
    assert capped.tolist() == [[0, 0, 0, 1, 1], [1, 0, 0, 0, 0]]  # the 2 most recent of u1


def test_time_split_by_global_cutoff() -> None:
    df = frame([("u", "a", "2026-01-01"), ("u", "b", "2026-01-05"), ("v", "c", "2026-01-09T12:00:00Z")])
    train, test = time_split(df, test_days=4.5)
    assert list(train["item_id"]) == ["a"]
    assert list(test["item_id"]) == ["b", "c"]
    with pytest.raises(ValueError, match="positive"):
        time_split(df, 0)


# ---------------------------------------------------------------------------------------------
# Top-k
# ---------------------------------------------------------------------------------------------
def brute_force_top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    y = x / np.where(norms > 0, norms, 1)
    scores = (y @ y.T).astype(np.float64)
    np.fill_diagonal(scores, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), scores.shape), -scores), axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("backend", ["numpy", "tensorflow"])
def test_top_k_similar_equals_brute_force(backend: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x[10] = x[3]  # exact ties: broken by the lower index
    x[20] = 2 * x[3]
    indices, scores = top_k_similar(x, 7, block_size=64, backend=backend)
    expected_idx, expected_scores = brute_force_top_k(x.astype(np.float64), 7)
    assert indices.shape == (300, 7) and indices.dtype == np.int32 and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    agree = (indices == expected_idx).mean()
    assert agree > 0.99  # float32 vs float64 may swap near-equal neighbours
    assert list(indices[3][:2]) == [10, 20] and list(indices[10][:2]) == [3, 20]
    assert not (indices == np.arange(300)[:, None]).any()


def test_top_k_similar_backends_agree_and_cap_k() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    x[5] = 0.0  # a zero vector scores 0 against everything
    a = top_k_similar(x, 100, block_size=16, backend="numpy")
    b = top_k_similar(x, 100, block_size=7, backend="tensorflow")
    assert a[0].shape == (50, 49)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        top_k_similar(np.full((3, 2), np.nan, np.float32), 1)


def test_top_k_sparse_and_recommendation_frame() -> None:
    dense = np.array(
        [[5, 1, 3, 0], [1, 5, 0, 0], [2, 2, 9, 0], [0, 0, 0, 4]],
        dtype=np.float32,
    )
    indices, scores = top_k_sparse(sparse.csr_matrix(dense), 2, block_size=3)
    assert indices.tolist() == [[2, 1], [0, -1], [0, 1], [-1, -1]]  # row 2: tie 2 = 2 -> index 0 first
    recs = to_recommendations(np.array(["a", "b", "c", "d"], dtype=object), indices, scores)
    assert recs.to_dict("list") == {
        "item_id": ["a", "a", "b", "c", "c"],
        "rank": [1, 2, 1, 1, 2],
        "rec_item_id": ["c", "b", "a", "a", "b"],
        "score": [3.0, 1.0, 1.0, 2.0, 2.0],
    }


# ---------------------------------------------------------------------------------------------
# The baselines' arithmetic
# ---------------------------------------------------------------------------------------------
def test_log_likelihood_ratio_matches_mahout() -> None:
    assert log_likelihood_ratio(np.array([1.0]), np.array([0.0]), np.array([0.0]), np.array([1.0]))[
        0
    ] == pytest.approx(4 * math.log(2))
    assert log_likelihood_ratio(*[np.array([v]) for v in (10.0, 0.0, 0.0, 10.0)])[0] == pytest.approx(
        27.725887222397812
    )
    assert log_likelihood_ratio(*[np.array([v]) for v in (5.0, 5.0, 5.0, 5.0)])[0] == pytest.approx(0.0)


def test_item_knn_llr_and_rules_on_inline_data() -> None:
    # u1: a b c, u2: a b, u3: c d (time order as listed)
    rows = [("u1", "a", "01"), ("u1", "b", "02"), ("u1", "c", "03"), ("u2", "a", "01"), ("u2", "b", "02")]
    rows += [("u3", "c", "01"), ("u3", "d", "02")]
    df = frame([(u, i, f"2026-01-01T00:00:{t}Z") for u, i, t in rows])
    knn = ItemKNN(min_item_count=1).fit(df).recommend(3)
    a = knn[knn["item_id"] == "a"]
    assert list(a["rec_item_id"]) == ["b", "c"]
    assert a["score"].tolist() == pytest.approx([1.0, 1 / 2])  # |a&b|=2/sqrt(2*2), |a&c|=1/sqrt(2*2)
    llr = LLRCooccurrence(min_item_count=1).fit(df).recommend(3)
    assert list(llr[llr["item_id"] == "a"]["rec_item_id"]) == ["b"]  # a & c: below independence
    rules = SequentialRules(min_item_count=1, window=2).fit(df).recommend(3)
    got = {(i, r): s for i, r, s in zip(rules["item_id"], rules["rec_item_id"], rules["score"], strict=True)}
    assert got == {("a", "b"): 2.0, ("a", "c"): 0.5, ("b", "c"): 1.0, ("c", "d"): 1.0}


def test_popularity_never_recommends_the_item_itself() -> None:
    df = frame([(f"u{n}", item, "2026-01-01") for n, item in enumerate("aaaabbbccd")])
    recs = Popularity(min_item_count=1).fit(df).recommend(2)
    assert recs.groupby("item_id")["rec_item_id"].apply(list).to_dict() == {
        "a": ["b", "c"],
        "b": ["a", "c"],
        "c": ["a", "b"],
        "d": ["a", "b"],
    }


def test_skipgram_pairs_respect_users_and_window() -> None:
    codes = np.array([0, 1, 2, 3, 4, 5], np.int32)
    user = np.array([0, 0, 0, 1, 1, 1], np.int32)
    target, context = skipgram_pairs(codes, user, 1, np.random.default_rng(0), shuffle=False)
    pairs = set(zip(target.tolist(), context.tolist(), strict=True))
    assert pairs == {(0, 1), (1, 0), (1, 2), (2, 1), (3, 4), (4, 3), (4, 5), (5, 4)}
    keep = subsample_keep_probability(np.array([1000, 1, 0]), 0.001)
    assert keep[0] < 0.1 and keep[1] == 1.0 and keep[2] == 1.0


# ---------------------------------------------------------------------------------------------
# Every model: the interface, and the planted structure
# ---------------------------------------------------------------------------------------------
def test_registry_and_build_model() -> None:
    assert set(MODELS) == {"next_item2vec", "item2vec", "popularity", "item_knn", "llr", "sequential_rules"}
    assert load_config().training.model.name == "next_item2vec"
    model = build_model("sequential_rules", load_config().training.model)
    assert isinstance(model, SequentialRules) and model.params["window"] == 5
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope", SMALL)
    with pytest.raises(NotFittedError):
        build_model("popularity", SMALL).recommend(5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_keeps_the_interface_and_finds_planted_neighbours(name: str, world_data: tuple) -> None:
    df, planted = world_data
    model = build_model(name, SMALL).fit(df)
    k = 10
    recs = model.recommend(k)
    check_recommendations(
        recs, k, model.item_ids, exact_k=name in ("next_item2vec", "item2vec", "popularity")
    )
    assert recs["rank"].dtype == np.int32 and recs["score"].dtype == np.float64
    meta = model.metadata()
    assert meta["name"] == name and meta["model_version"].startswith(name.replace("_", "-") + "-")
    assert meta["n_items"] == len(model.item_ids) and meta["n_interactions"] == len(df)
    assert meta["train_seconds"] >= 0
    recall = planted_recall(recs, planted)
    # Chance: 4 neighbours among 199 others, ~0.02; the best possible is 4 / 5 = 0.8.
    if name == "popularity":
        assert recall < 0.1
    else:
        assert recall > 0.5, f"{name} recovers only {recall:.2f} of the planted neighbours"


def test_item2vec_is_reproducible_for_a_seed(world_data: tuple) -> None:
    df, _ = world_data
    cfg = SMALL.model_copy(update={"epochs": 2})
    first = Item2Vec(cfg).fit(df)
    second = Item2Vec(cfg).fit(df)
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    pd.testing.assert_frame_equal(first.recommend(5), second.recommend(5))
    assert first.metadata()["epoch_loss"] == second.metadata()["epoch_loss"]
    other = Item2Vec(cfg.model_copy(update={"seed": 8})).fit(df)
    assert not np.array_equal(first.embeddings, other.embeddings)
    meta = first.metadata()
    assert len(meta["epoch_loss"]) == 2 and meta["epoch_loss"][-1] < meta["epoch_loss"][0]
    assert meta["params"]["embedding_dim"] == 16 and meta["embedding_shape"] == [meta["n_items"], 16]


@pytest.mark.parametrize(
    "options",
    [{"negative_sharing": 1}, {"optimizer": "sgd", "output": "average"}],
    ids=["per-pair-negatives", "sgd-average"],
)
def test_item2vec_variants_find_planted_neighbours(options: dict, world_data: tuple) -> None:
    df, planted = world_data
    cfg = SMALL.model_copy(update={"learning_rate": 0.025} if options.get("optimizer") == "sgd" else {})
    model = Item2Vec(cfg, **options).fit(df)
    recs = model.recommend(5)
    check_recommendations(recs, 5, model.item_ids, exact_k=True)
    assert planted_recall(recs, planted) > 0.5
    assert model.metadata()["params"] | options == model.metadata()["params"]


def test_item2vec_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        Item2Vec(SMALL, optimizer="rmsprop")
    with pytest.raises(ValueError, match="output"):
        Item2Vec(SMALL, output="context")


# ---------------------------------------------------------------------------------------------
# NextItem2Vec: directed pairs, asymmetric top-k, reproducibility
# ---------------------------------------------------------------------------------------------
def test_forward_pairs_are_directed_within_users_and_window() -> None:
    codes = np.array([0, 1, 2, 3, 4, 4, 5], np.int32)
    user = np.array([0, 0, 0, 1, 1, 1, 1], np.int32)
    rng = np.random.default_rng(0)
    a, b = forward_pairs(codes, user, 2, rng, distance_decay=0.0, shuffle=False)
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == {(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 4)}
    assert len(a) == 7  # (3, 4) and (4, 5) at distances 1 and 2 (two 4s); (4, 4) never
    a, b = forward_pairs(codes, user, 1, rng, backward_weight=1.0, shuffle=False)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == sorted(
        [(0, 1), (1, 2), (3, 4), (4, 5), (1, 0), (2, 1), (4, 3), (5, 4)]
    )
    # Distance weighting: pairs at distance d are drawn with probability d ** -decay.
    long_codes = np.arange(20_000, dtype=np.int32) % 1000
    a, b = forward_pairs(long_codes, np.zeros(20_000, np.int32), 2, rng, distance_decay=1.0, shuffle=False)
    far = int(((b - a) % 1000 == 2).sum())
    assert 0.45 < far / 19_998 < 0.55


def test_popularity_prior_is_the_log_noise_probability_over_keep() -> None:
    counts = np.array([16.0, 1.0, 0.0])
    prior = popularity_prior(counts, np.array([0.5, 1.0, 1.0]))
    total = 16**0.75 + 1
    np.testing.assert_allclose(prior[:2], [np.log(8 / total) - np.log(0.5), np.log(1 / total)], rtol=1e-6)
    assert prior[2] == prior[:2].min()


@pytest.mark.parametrize("backend", ["tensorflow", "numpy"])
def test_top_k_scores_equals_brute_force(backend: str) -> None:
    rng = np.random.default_rng(5)
    queries, keys = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(size=(60, 8)).astype(np.float32)
    bias = rng.normal(size=60).astype(np.float32)
    indices, scores = top_k_scores(queries, keys, 7, key_bias=bias, block_size=16, backend=backend)
    full = queries @ keys.T + bias[None, :]
    np.fill_diagonal(full, -np.inf)
    expected = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), rtol=1e-5, atol=1e-5)
    # Asymmetric: i -> j and j -> i differ.
    assert not np.allclose(full, full.T)
    with pytest.raises(ValueError, match="key_bias"):
        top_k_scores(queries, keys, 3, key_bias=bias[:5])


@pytest.mark.parametrize("backend", ["tensorflow", "numpy"])
def test_top_k_blended_equals_the_brute_force_standardised_blend(backend: str) -> None:
    rng = np.random.default_rng(11)
    n = 80
    queries, keys = rng.normal(size=(n, 6)), rng.normal(size=(n, 6))
    similarity, bias = rng.normal(size=(n, 4)), rng.normal(size=n)
    unit = similarity / np.linalg.norm(similarity, axis=1, keepdims=True)
    score, cosine = queries @ keys.T + bias[None, :], unit @ unit.T

    def z(m: np.ndarray) -> np.ndarray:  # standardised per row, over all items
        return (m - m.mean(axis=1, keepdims=True)) / m.std(axis=1, keepdims=True)

    for alpha in (0.0, 0.25, 0.7, 1.0):
        indices, scores = top_k_blended(
            queries, keys, similarity, 7, alpha, key_bias=bias, block_size=16, backend=backend
        )
        full = alpha * z(cosine) + (1 - alpha) * z(score)
        np.fill_diagonal(full, -np.inf)
        expected = np.argsort(-full, axis=1, kind="stable")[:, :7]
        np.testing.assert_array_equal(indices, expected, err_msg=f"alpha {alpha}")
        np.testing.assert_allclose(scores, np.take_along_axis(full, expected, axis=1), atol=1e-4)
    # The ends are the two rankings it blends.
    np.testing.assert_array_equal(
        top_k_blended(queries, keys, similarity, 5, 0.0, key_bias=bias, backend=backend)[0],
        top_k_scores(queries, keys, 5, key_bias=bias, backend=backend)[0],
    )
    np.testing.assert_array_equal(
        top_k_blended(queries, keys, similarity, 5, 1.0, backend=backend)[0],
        top_k_similar(similarity, 5, backend=backend)[0],
    )
    with pytest.raises(ValueError, match="alpha"):
        top_k_blended(queries, keys, similarity, 5, 1.5)
    with pytest.raises(ValueError, match="same items"):
        top_k_blended(queries, keys, similarity[:10], 5, 0.5)


def test_unique_rows_is_a_fixed_shape_unique() -> None:
    import tensorflow as tf

    rng = np.random.default_rng(3)
    compiled = tf.function(lambda index: unique_rows(tf, index, 40), jit_compile=True)
    for index in (rng.integers(0, 40, 300), np.array([7] * 5), np.arange(9)[::-1], np.array([40, 3, 40])):
        index = index.astype(np.int32)
        unique, position = (t.numpy() for t in compiled(index))
        distinct = np.unique(index)
        assert unique.shape == position.shape == index.shape
        np.testing.assert_array_equal(unique[: len(distinct)], distinct)
        assert (unique[len(distinct) :] == 40).all()  # the padding row fills the rest
        np.testing.assert_array_equal(unique[position], index)


def test_sampled_softmax_replicas_share_the_batches_and_merge() -> None:
    import tensorflow as tf

    rng = np.random.default_rng(5)
    n, pairs = 50, 2600
    source = rng.integers(0, n, pairs).astype(np.int32)
    target = ((source + 1) % n).astype(np.int32)  # item i is followed by item i + 1: learnable
    counts = np.bincount(np.concatenate([source, target]), minlength=n)
    noise = unigram_table(counts)
    log_q = np.log(np.bincount(noise, minlength=n) / len(noise))
    options = {"n_items": n, "dim": 8, "negatives": 16, "batch": 256, "rate": 0.01, "seed": 1}
    options |= {"noise_table": noise, "log_q": log_q}
    trainer = SampledSoftmaxTrainer(tf, **options, pairs_per_epoch=pairs, epochs=2, replicas=2)
    try:
        # 11 batches an epoch: 6 and 5 per replica, in chunks of 6 steps (sized to the data).
        assert (trainer.replicas, trainer.chunk_steps) == (2, 6)
        first = trainer.train_epoch(source, target)
        assert [int(s.numpy()) for s in trainer.steps] == [6, 5]  # the all-padding step does not count
        assert np.isfinite(first) and trainer.train_epoch(source, target) < first
        # After each round the replicas hold the same merged state.
        for side in (0, 1):
            np.testing.assert_array_equal(trainer.states[0][side].numpy(), trainer.states[1][side].numpy())
        w, c = trainer.tables()
        assert w.shape == (n, 9) and c.shape == (n, 9) and (w[:, -1] == 1).all()
    finally:
        trainer.close()
    one = SampledSoftmaxTrainer(tf, **options, pairs_per_epoch=100, epochs=1, replicas=4)
    assert (one.replicas, one.chunk_steps) == (1, 1)  # one batch an epoch: one replica
    one.close()
    with pytest.raises(ValueError, match="replicas"):
        SampledSoftmaxTrainer(tf, **options, pairs_per_epoch=100, epochs=1, replicas=0)


@pytest.mark.parametrize("replicas", [1, 2])
def test_next_item2vec_is_reproducible_and_learns_direction(replicas: int, world_data: tuple) -> None:
    df, planted = world_data
    cfg = SMALL.model_copy(update={"epochs": 2, "validation_share": 0.0})
    first = NextItem2Vec(cfg, sampled_negatives=64, replicas=replicas).fit(df)
    second = NextItem2Vec(cfg, sampled_negatives=64, replicas=replicas).fit(df)
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    np.testing.assert_array_equal(first.output_embeddings, second.output_embeddings)
    pd.testing.assert_frame_equal(first.recommend(5), second.recommend(5))
    meta = first.metadata()
    assert meta["training_layout"]["replicas"] == replicas
    assert planted_recall(first.recommend(5), planted) > 0.5
    assert meta["params"]["loss"] == "softmax" and meta["epoch_loss"][-1] < meta["epoch_loss"][0]
    assert "name" not in meta["params"]
    # Directed data: every user walks a -> b -> c, never back; b must follow a, not precede it.
    rows = [(f"u{u}", item, f"2026-01-01T00:00:0{t}Z") for u in range(60) for t, item in enumerate("abc")]
    rows += [(f"v{u}", item, f"2026-01-01T00:00:0{t}Z") for u in range(60) for t, item in enumerate("xyz")]
    directed = SMALL.model_copy(update={"epochs": 20, "window": 1, "learning_rate": 0.05, "subsample": 0.0})
    model = NextItem2Vec(directed, sampled_negatives=4, backward_weight=0.0)
    recs = model.fit(frame(rows)).recommend(1)
    top = dict(zip(recs["item_id"], recs["rec_item_id"], strict=True))
    assert top["a"] == "b" and top["b"] == "c" and top["x"] == "y" and top["y"] == "z"
    with pytest.raises(ValueError, match="loss"):
        NextItem2Vec(SMALL, loss="hinge")


def test_effective_params_switch_to_the_large_settings_from_the_threshold() -> None:
    params = SMALL.model_dump() | {"sampled_negatives": 512, "backward_weight": 0.5}
    params |= {"large_data_items": 100, "large_epochs": 2, "large_sampled_negatives": 64}
    params |= {"cosine_blend": 0.0, "large_cosine_blend": 0.4}
    below, large = effective_params(params, 99)
    assert not large and below == params
    at, large = effective_params(params, 100)
    assert large and at == params | {"epochs": 2, "sampled_negatives": 64, "cosine_blend": 0.4}
    assert set(LARGE_DATA_KEYS) == {"epochs", "sampled_negatives", "cosine_blend"}
    never, large = effective_params(params | {"large_data_items": 0}, 10**9)
    assert not large and never == params | {"large_data_items": 0}


def test_next_item2vec_uses_the_large_data_settings_on_large_data(world_data: tuple) -> None:
    df, planted = world_data
    cfg = SMALL.model_copy(
        update={
            "large_data_items": 1000,
            "large_epochs": 3,
            "large_sampled_negatives": 64,
            "large_cosine_blend": 0.25,
        }
    )
    model = NextItem2Vec(cfg).fit(df)
    meta = model.metadata()
    assert meta["large_data"] and len(meta["epoch_loss"]) == 3
    # No validation split on large data: the time budget's passes.
    assert meta["validation"]["skipped"].startswith("large data")
    assert meta["fit_params"] == {"epochs": 3, "sampled_negatives": 64, "cosine_blend": 0.25}
    assert meta["params"]["epochs"] == SMALL.epochs  # the configured values stay in the version
    assert meta["scoring"].startswith("cosine_blend * z(cos(input, input))")
    recs = model.recommend(5)
    check_recommendations(recs, 5, model.item_ids, exact_k=True)
    assert planted_recall(recs, planted) > 0.5
    # The blend ranks by the input cosine (bias column left out) and the next-item score.
    inputs, outputs = model.embeddings, model.output_embeddings
    blended = top_k_blended(inputs, outputs, inputs[:, :-1], 5, 0.25)
    np.testing.assert_array_equal(model.top_k(5)[0], blended[0])
    np.testing.assert_array_equal(model.top_k(5, cosine_blend=0.0)[0], top_k_scores(inputs, outputs, 5)[0])
    small_model = NextItem2Vec(SMALL.model_copy(update={"epochs": 1, "validation_share": 0.0})).fit(df)
    small = small_model.metadata()
    assert not small["large_data"]
    assert small["fit_params"] == {"epochs": 1, "sampled_negatives": 512, "cosine_blend": 0.0}
    assert small["scoring"].startswith("input . output")
    with pytest.raises(ValueError, match="large_cosine_blend"):
        NextItem2Vec(SMALL, large_cosine_blend=1.5)


@pytest.mark.parametrize("tables", ["plain", "with bias", "with ties"])
def test_next_item_metrics_equal_evaluate_on_the_top_k_lists(tables: str) -> None:
    """The validation's ranks, scored from the tables, are evaluate's on the model's top-k lists."""
    rng = np.random.default_rng(5)
    n, k = 60, 7
    queries, keys = rng.normal(size=(n, 8)).astype(np.float32), rng.normal(size=(n, 8)).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32) if tables == "with bias" else None
    if tables == "with ties":
        # Untrained output rows (zeros) score 0 after every item: the lists break the tie by index.
        keys[::3] = 0.0
        queries[:, 0], keys[:, 0] = 1.0, np.where(keys[:, 0] == 0, 0.0, -5.0)
    seeds = rng.integers(0, n, 700)
    targets = (seeds + rng.integers(1, n, 700)) % n  # never the seed itself
    indices, scores = top_k_scores(queries, keys, k, key_bias=bias)
    ids = np.array([f"i{j}" for j in range(n)], dtype=object)
    recs = to_recommendations(ids, indices, scores)
    expected = ranking_metrics(recs, (ids[seeds], ids[targets]), k)
    got = next_item_metrics(queries, keys, bias, seeds, targets, k)
    assert expected["recall@k"] > 0
    assert got["recall"] == pytest.approx(expected["recall@k"], abs=1e-12)
    assert got["mrr"] == pytest.approx(expected["mrr@k"], abs=1e-12)


def test_validation_split_cuts_off_the_newest_interactions_and_their_next_items() -> None:
    # Ten users each view a, b, b, c, d an hour apart (u0 first ... u9 last, a minute apart), and
    # an early user w views c, then d.
    rows = [
        (f"u{u}", item, f"2026-01-01T{h:02d}:{u:02d}:00Z")
        for u in range(10)
        for h, item in enumerate("abbcd")
    ]
    rows += [("w", "c", "2026-01-01T00:58:00Z"), ("w", "d", "2026-01-01T00:59:00Z")]
    items = np.array(["a", "b", "c", "d"], dtype=object)
    # The newest 30 % of the 52 rows: from the 37th oldest (03:04, c of u4) on.
    split = validation_split(frame(rows), items, 0.3, seed=1, max_pairs=100)
    assert split.cut == pd.Timestamp("2026-01-01T03:04:00Z")
    # Before the cut: a, b (the repeat collapsed) of everyone, c of u0..u3, w's c and d.
    assert len(split.fit_codes) == len(split.fit_user) == 20 + 4 + 2
    assert split.users == 10 and split.unknown == 0
    # Only users with two items after the cut give a pair: c -> d of u4..u9.
    assert sorted(zip(items[split.seeds], items[split.targets], strict=True)) == [("c", "d")] * 6
    capped = validation_split(frame(rows), items, 0.3, seed=1, max_pairs=2)
    assert capped.pairs == 2
    assert validation_split(frame(rows), items, 0.0, seed=1, max_pairs=100).users == 0
    # Without w, d has no interaction before the cut: not in the validation fit, so c -> d is a
    # miss, as an item new after the training window is in evaluate.
    late = validation_split(frame(rows[:-2]), items, 0.3, seed=1, max_pairs=100)
    assert len(late.seeds) == 0 and late.unknown == late.pairs > 0
    # An item outside the vocabulary (z) is never a token, and its pair d -> z is a miss.
    rare = validation_split(frame([*rows, ("u0", "z", "2026-01-01T09:00:00Z")]), items, 0.3, 1, 100)
    assert rare.unknown == 1 and len(rare.seeds) == rare.pairs - 1 > 0


def test_chosen_pass_takes_the_last_pass_within_noise_of_the_best() -> None:
    rng = np.random.default_rng(3)
    base = rng.random(4000) * (rng.random(4000) < 0.6)

    def swapped(ranks: np.ndarray, seed: int) -> np.ndarray:
        """The same ranks, some pairs' exchanged: other pairs hit, the same mean."""
        order = np.random.default_rng(seed).permutation(ranks.size)[:400]
        out = ranks.copy()
        out[order] = ranks[order[::-1]]
        return out

    # A plateau: the passes differ by which pairs they get right, not by how many: the most passes.
    assert chosen_pass([base, swapped(base, 1), swapped(base, 2), swapped(base, 3)]) == (4, [False] * 4)
    # Better, then clearly worse: the best pass, and the later ones marked worse.
    falling = [base * 0.8, base, base * 0.9, base * 0.85]
    assert chosen_pass(falling) == (2, [True, False, True, True])
    # The validation fit stops after `patience` clearly worse passes in a row, not before.
    assert not should_stop([False, True], 2) and should_stop([False, True, True], 2)
    assert not should_stop([False, True, False, True], 2) and should_stop([False, True], 1)
    assert not should_stop([True], 2)


def test_next_item2vec_chooses_its_passes_on_a_validation_split(world_data: tuple) -> None:
    df, planted = world_data
    cfg = SMALL.model_copy(
        update={"validation_share": 0.2, "validation_max_epochs": 6, "validation_patience": 1}
    )
    model = NextItem2Vec(cfg, sampled_negatives=64).fit(df)
    meta = model.metadata()
    chosen = meta["validation"]
    assert chosen["pairs"] >= 500 and chosen["users"] > 0 and chosen["k"] == 20
    cut = pd.Timestamp(chosen["cut"])
    assert (df["event_time"] >= cut).mean() == pytest.approx(0.2, abs=0.01)
    assert 1 <= chosen["epochs"] <= len(chosen["mrr_by_epoch"]) <= 6
    assert len(chosen["recall_by_epoch"]) == len(chosen["mrr_by_epoch"])
    # The model itself is fitted on all the interactions with the chosen passes.
    assert len(meta["epoch_loss"]) == chosen["epochs"] == meta["fit_params"]["epochs"]
    assert planted_recall(model.recommend(5), planted) > 0.5
    # Off, or too few pairs after the cut: the configured epochs.
    off = NextItem2Vec(cfg.model_copy(update={"validation_share": 0.0}), sampled_negatives=64).fit(df)
    assert len(off.metadata()["epoch_loss"]) == SMALL.epochs
    assert off.metadata()["validation"]["skipped"].startswith("validation_share 0")
    few = NextItem2Vec(cfg.model_copy(update={"validation_min_pairs": 10**6}), sampled_negatives=64)
    few_meta = few.fit(df).metadata()
    assert len(few_meta["epoch_loss"]) == SMALL.epochs
    assert "validation_min_pairs 1000000" in few_meta["validation"]["skipped"]
