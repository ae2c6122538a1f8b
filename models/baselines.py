"""Baseline item-to-item models: what Item2Vec has to beat.

Role: simple, strong, well-understood references for the evaluation, behind the same interface
(:class:`models.base.ItemToItemModel`):

* :class:`Popularity` - the k most popular other items, the same list for every item;
* :class:`ItemKNN` - cosine similarity of the items' user vectors (binary user x item matrix);
* :class:`LLRCooccurrence` - Dunning's log-likelihood ratio of user co-occurrence (as in Mahout's
  correlated cross-occurrence), positively associated pairs only;
* :class:`SequentialRules` - "B follows A": forward co-occurrence within the next ``window`` items
  of a user's time-ordered sequence, weighted 1 / distance.

Inputs: an interaction frame (see :mod:`models.interactions`); ``min_item_count`` (all) and
``window`` (SequentialRules) from :class:`carousel.config.ModelConfig`; keyword parameters.

Outputs: recommendation frames (see :mod:`models.base`). Co-occurrence models only recommend
items that co-occurred, so an item may get fewer than k. Memory stays bounded at 5M interactions
/ 100k items: the item x item products are computed in row blocks sized by their estimated work
(scipy.sparse), each block reduced to its top k at once; nothing dense is n x n.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np
from scipy import sparse

from carousel.config import ModelConfig
from models.base import ItemToItemModel
from models.interactions import Sequences, user_item_matrix
from models.topk import sparse_block_top_k, top_k_sparse

__all__ = ["ItemKNN", "LLRCooccurrence", "Popularity", "SequentialRules", "log_likelihood_ratio"]

log = logging.getLogger(__name__)

DEFAULT_MAX_ITEMS_PER_USER = 500
DEFAULT_BLOCK_WORK = 30_000_000  # co-occurrence products (~ stored entries) per row block


class Popularity(ItemToItemModel):
    """Every item gets the k most interacted-with other items (score = interaction count)."""

    name: ClassVar[str] = "popularity"
    config_keys: ClassVar[tuple[str, ...]] = ("min_item_count",)

    def _fit(self, sequences: Sequences) -> None:
        counts = sequences.counts
        # Most popular first, ties by the lower item index.
        self._order = np.lexsort((np.arange(len(counts)), -counts))

    def _top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        sequences = self._require_fitted()
        n = sequences.n_items
        k = min(k, n - 1)
        head = self._order[: k + 1]
        candidates = np.broadcast_to(head, (n, len(head)))
        is_self = candidates == np.arange(n)[:, None]
        # A stable sort moves the item itself (if among the head) to the end.
        picked = np.take_along_axis(candidates, np.argsort(is_self, axis=1, kind="stable"), axis=1)[:, :k]
        return picked.astype(np.int32), sequences.counts[picked].astype(np.float32)


def _item_blocks(work: np.ndarray, budget: int, max_rows: int = 8192) -> list[tuple[int, int]]:
    """Consecutive row ranges whose summed ``work`` stays near ``budget`` (at least one row each)."""
    blocks: list[tuple[int, int]] = []
    cumulative = np.cumsum(work, dtype=np.float64)
    start, n = 0, len(work)
    while start < n:
        base = cumulative[start - 1] if start else 0.0
        stop = int(np.searchsorted(cumulative, base + budget, side="right"))
        stop = min(n, max(start + 1, stop), start + max_rows)
        blocks.append((start, stop))
        start = stop
    return blocks


class _CooccurrenceModel(ItemToItemModel):
    """Shared machinery: the binary user x item matrix, and item x item products in row blocks."""

    config_keys: ClassVar[tuple[str, ...]] = ("min_item_count",)

    def __init__(
        self,
        model_cfg: ModelConfig | None = None,
        max_items_per_user: int | None = DEFAULT_MAX_ITEMS_PER_USER,
        block_work: int = DEFAULT_BLOCK_WORK,
        **params: Any,
    ) -> None:
        super().__init__(model_cfg, max_items_per_user=max_items_per_user, **params)
        self.block_work = block_work

    def _fit(self, sequences: Sequences) -> None:
        self._users_items = user_item_matrix(sequences, self.params["max_items_per_user"])
        self._items_users = self._users_items.T.tocsr()
        self._degree = np.diff(self._items_users.indptr).astype(np.float64)  # users per item

    def _block_scores(self, block: sparse.csr_matrix, start: int, stop: int) -> sparse.csr_matrix:
        """Turn a block of co-occurrence counts (rows start..stop) into scores, in place."""
        raise NotImplementedError

    def _top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        sequences = self._require_fitted()
        n = sequences.n_items
        k = min(k, n - 1)
        x, xt = self._users_items, self._items_users
        user_degree = np.diff(x.indptr).astype(np.float64)
        work = xt @ user_degree  # the products each item row takes: an upper bound of its nnz
        indices = np.full((n, k), -1, np.int32)
        scores = np.full((n, k), np.nan, np.float32)
        started = time.perf_counter()
        blocks = _item_blocks(work, self.block_work)
        for start, stop in blocks:
            block = (xt[start:stop] @ x).tocsr()
            block = self._block_scores(block, start, stop)
            sparse_block_top_k(block, start, k, indices[start:stop], scores[start:stop], min_score=0.0)
        log.info(
            "%s: top-%d of %d items in %d blocks, %.1f s",
            self.name,
            k,
            n,
            len(blocks),
            time.perf_counter() - started,
        )
        return indices, scores


class ItemKNN(_CooccurrenceModel):
    """Cosine similarity of binary item vectors over users: |U_i & U_j| / sqrt(|U_i| |U_j|).

    ``shrink`` (default 0) damps pairs with little support: |U_i & U_j| / (sqrt(...) + shrink).
    """

    name: ClassVar[str] = "item_knn"

    def __init__(
        self,
        model_cfg: ModelConfig | None = None,
        shrink: float = 0.0,
        max_items_per_user: int | None = DEFAULT_MAX_ITEMS_PER_USER,
        block_work: int = DEFAULT_BLOCK_WORK,
        **params: Any,
    ) -> None:
        super().__init__(
            model_cfg, max_items_per_user=max_items_per_user, block_work=block_work, shrink=shrink, **params
        )

    def _block_scores(self, block: sparse.csr_matrix, start: int, stop: int) -> sparse.csr_matrix:
        norms = np.sqrt(self._degree)
        rows = np.repeat(np.arange(start, stop), np.diff(block.indptr))
        denominator = norms[rows] * norms[block.indices] + float(self.params["shrink"])
        block.data = (block.data / denominator).astype(np.float32)
        return block


def log_likelihood_ratio(k11: np.ndarray, k12: np.ndarray, k21: np.ndarray, k22: np.ndarray) -> np.ndarray:
    """Dunning's G^2 of 2x2 contingency tables (vectorised; Mahout's ``logLikelihoodRatio``)."""

    def xlogx(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)

    def entropy(*counts: np.ndarray) -> np.ndarray:
        return xlogx(sum(counts)) - sum(xlogx(c) for c in counts)

    row = entropy(k11 + k12, k21 + k22)
    column = entropy(k11 + k21, k12 + k22)
    matrix = entropy(k11, k12, k21, k22)
    return np.maximum(0.0, 2.0 * (row + column - matrix))


class LLRCooccurrence(_CooccurrenceModel):
    """Log-likelihood ratio of "user has i" vs "user has j" (Mahout CCO), positive association only.

    Score = G^2 of the 2x2 table (both, i only, j only, neither) over users; pairs co-occurring less
    than independence predicts are dropped.
    """

    name: ClassVar[str] = "llr"

    def _block_scores(self, block: sparse.csr_matrix, start: int, stop: int) -> sparse.csr_matrix:
        n_users = float(self._users_items.shape[0])
        rows = np.repeat(np.arange(start, stop), np.diff(block.indptr))
        k11 = block.data.astype(np.float64)
        n_i = self._degree[rows]
        n_j = self._degree[block.indices]
        k12 = n_i - k11
        k21 = n_j - k11
        k22 = n_users - n_i - n_j + k11
        llr = log_likelihood_ratio(k11, k12, k21, k22)
        positive = k11 * n_users > n_i * n_j
        block.data = np.where(positive, llr, 0.0).astype(np.float32)
        return block


class SequentialRules(ItemToItemModel):
    """Forward rules A -> B: B within the next ``window`` items after A, weight 1 / distance.

    The score of (A, B) is the summed weight over every user's sequence (consecutive repeats are
    collapsed first; pairs of an item with itself are skipped).
    """

    name: ClassVar[str] = "sequential_rules"
    config_keys: ClassVar[tuple[str, ...]] = ("min_item_count", "window")

    def _fit(self, sequences: Sequences) -> None:
        n = sequences.n_items
        window = int(self._param("window", 5))
        codes = sequences.codes
        user = sequences.user_of_token()
        matrix = sparse.csr_matrix((n, n), dtype=np.float32)
        for distance in range(1, window + 1):
            if distance >= len(codes):
                break
            same = user[distance:] == user[:-distance]
            a, b = codes[:-distance][same], codes[distance:][same]
            other = a != b
            a, b = a[other], b[other]
            weights = np.full(len(a), 1.0 / distance, dtype=np.float32)
            matrix = matrix + sparse.csr_matrix((weights, (a, b)), shape=(n, n))
        matrix.sum_duplicates()
        self._rules = matrix.tocsr()

    def _top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = self._require_fitted().n_items
        return top_k_sparse(self._rules, min(k, n - 1), min_score=0.0)

    def _extra_metadata(self) -> dict[str, Any]:
        return {"n_rules": int(self._rules.nnz)}
