"""Content neighbours of catalog products: TF-IDF over what marketers upload, for new products.

Role: the item cold start. A product the published matrix has no list for (new in the catalog, or
too few interactions for the model to keep it) still gets neighbours from its content, and still
reaches users through the exploration slots of ranking (:mod:`carousel.ranking`). Until the next
model includes it, these lists stand in for its behavioural ones; once the model has it, the
matrix's list is used and its content list is no longer built.

Inputs: the catalog as an Arrow table (``item_id``, ``title``, ``description``, ``category``,
``price``, ``properties``). Outputs: for each query product, its ``k`` most similar products by
cosine of TF-IDF vectors (:func:`content_neighbours`). The terms of a product
(:func:`product_terms`): the words of its title and description, its category, its brand (or
collection) property and its price band (powers of two), each field's terms kept apart
(``category:shoes`` is not the word "shoes"). Pure numpy / scipy, no Spark: it runs where the
item lists are built (the serving lookups' worker thread, the campaign driver). A library
module, no command of its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

# Catalog properties that name a product family: a shared brand or collection says a lot.
FAMILY_PROPERTIES: tuple[str, ...] = ("brand", "collection")
_WORD = re.compile(r"[^\W_]{2,}", re.UNICODE)
# Query products scored per block, so that a block's dense similarities (block x candidates)
# hold at most this many cells: about 64 queries against a 100k-product category, 4 against 1M.
_BLOCK_CELLS = 4_000_000


def _price_band(price: Any) -> str | None:
    if price is None or not isinstance(price, int | float) or not math.isfinite(price) or price <= 0:
        return None
    return f"price:{math.floor(math.log2(price))}"


def product_terms(product: dict[str, Any]) -> list[str]:
    """The terms of one catalog row (a dict of its columns)."""
    terms = [w.lower() for field in ("title", "description") for w in _WORD.findall(product.get(field) or "")]
    if product.get("category"):
        terms.append(f"category:{str(product['category']).lower()}")
    properties = dict(product.get("properties") or {})
    for name in FAMILY_PROPERTIES:
        if properties.get(name):
            terms.append(f"{name}:{str(properties[name]).lower()}")
    band = _price_band(product.get("price"))
    if band:
        terms.append(band)
    return terms


def tfidf_matrix(products: pa.Table) -> sp.csr_matrix:
    """One L2-normalised TF-IDF row per product (smooth idf: ``ln((1 + n) / (1 + df)) + 1``)."""
    columns = [
        c for c in ("title", "description", "category", "price", "properties") if c in products.column_names
    ]
    rows = products.select(columns).to_pylist()
    vocabulary: dict[str, int] = {}
    indptr, indices, counts = [0], [], []
    for row in rows:
        tally: dict[int, int] = {}
        for term in product_terms(row):
            code = vocabulary.setdefault(term, len(vocabulary))
            tally[code] = tally.get(code, 0) + 1
        indices.extend(tally)
        counts.extend(tally.values())
        indptr.append(len(indices))
    n = len(rows)
    matrix = sp.csr_matrix(
        (np.asarray(counts, np.float32), np.asarray(indices, np.int64), np.asarray(indptr, np.int64)),
        shape=(n, max(len(vocabulary), 1)),
    )
    document_frequency = np.bincount(matrix.indices, minlength=matrix.shape[1])
    idf = (np.log((1.0 + n) / (1.0 + document_frequency)) + 1.0).astype(np.float32)
    matrix = matrix.multiply(idf).tocsr()
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return sp.csr_matrix(sp.diags((1.0 / norms).astype(np.float32)) @ matrix)


def content_neighbours(
    vectors: sp.csr_matrix, queries: Sequence[int] | np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` candidates most similar to each query row: ``(query, neighbour, cosine)`` arrays,
    each query's neighbours best first (ties by row), never the query itself, only cosines > 0.

    ``candidates``: a boolean mask over the rows of ``vectors``."""
    queries = np.asarray(queries, dtype=np.int64)
    out_query: list[np.ndarray] = []
    out_neighbour: list[np.ndarray] = []
    out_cosine: list[np.ndarray] = []
    allowed = np.flatnonzero(candidates)
    if k <= 0 or len(queries) == 0 or len(allowed) == 0:
        empty = np.array([], np.int64)
        return empty, empty.copy(), np.array([], np.float32)
    pool = vectors[allowed].T.tocsc()
    step = max(1, min(64, _BLOCK_CELLS // len(allowed)))
    for start in range(0, len(queries), step):
        block = queries[start : start + step]
        similarity = np.asarray((vectors[block] @ pool).todense(), dtype=np.float32)
        # A product is not its own neighbour.
        own = allowed[None, :] == block[:, None]
        similarity[own] = 0.0
        take = min(k, similarity.shape[1])
        top = np.argpartition(-similarity, take - 1, axis=1)[:, :take]
        for row, query in enumerate(block):
            picked = top[row]
            scores = similarity[row, picked]
            order = np.lexsort((allowed[picked], -scores))
            picked, scores = picked[order], scores[order]
            positive = scores > 0
            out_query.append(np.full(int(positive.sum()), query, np.int64))
            out_neighbour.append(allowed[picked[positive]])
            out_cosine.append(scores[positive])
    return np.concatenate(out_query), np.concatenate(out_neighbour), np.concatenate(out_cosine)
