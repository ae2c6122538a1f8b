"""NextItem2Vec: directed skip-gram with negative sampling for next-item recommendations (TensorFlow).

Role: the default production item-to-item model. The recommendations answer "which item does a
user go to after this one", so the model learns exactly that: each item a is trained to predict
the items that come *after* it in a user's time-ordered sequence (forward context only), the
nearer the more often, and an item's recommendations are ranked by the model's own score of
"b follows a" instead of a symmetric similarity.

Inputs: an interaction frame (see :mod:`models.interactions`); hyperparameters from
:class:`carousel.config.ModelConfig`: ``embedding_dim``, ``window`` (the largest forward distance),
``negatives``, ``epochs``, ``batch_size``, ``learning_rate`` (lazy Adam), ``min_item_count``,
``subsample`` (word2vec's down-sampling threshold of frequent items; 0 = off), ``seed`` and
``cosine_blend`` (the ranking, below); the large-data settings ``large_data_items``,
``large_epochs``, ``large_sampled_negatives`` and ``large_cosine_blend`` (below); and the
``validation_*`` settings that choose the passes (Epochs, below).
Keyword options: ``distance_decay`` (a pair at distance d is drawn with probability d ** -decay
each epoch; 1 = the 1 / d weighting of :class:`models.baselines.SequentialRules`),
``popularity_weight`` (beta, below), ``negative_sharing`` and ``threads`` (as in
:class:`models.item2vec.Item2Vec`), ``replicas`` and ``chunk_steps`` (the parallel training, below).

How: every epoch the forward pairs (a, b) with b within ``window`` items after a (same user,
a != b) are drawn in numpy with the distance weights, after subsampling, shuffled (generator
seeded by (seed, epoch)), and fed to :class:`models.sampled_softmax.SampledSoftmaxTrainer`
(the default ``loss="softmax"``): sampled softmax with the logQ correction over
``sampled_negatives`` in-graph negatives from the unigram^0.75 table shared by each batch, lazy
Adam, whole chunks of steps in one XLA computation, and on large data ``replicas`` copies of the
tables (default: one per core, at most 4) training at once on disjoint batches, merged every
``chunk_steps`` steps; ``loss="sgns"`` uses :class:`models.item2vec._SkipGramTrainer` instead.
The input table W holds "where users come from", the output table C "where they go".

Large data: the cost of a step is dominated by the (batch x sampled negatives) logit matrix and
its two gradient products, i.e. by the negatives per pair, times the pairs, which grow with the
data. From ``large_data_items`` sequence items on (interactions after collapsing repeats; 0 =
never), :func:`effective_params` trains ``large_epochs`` passes with ``large_sampled_negatives``
negatives per batch instead (defaults 4 and 256 instead of 5 and 512; no validation split
chooses them, Epochs below): with ~50 interactions per item every item is seen often enough in 4
passes. Larger batches with fewer negatives, no
backward pairs or a higher rate were faster still but lost planted recall (measured at 1M
interactions / 20k items: bench/README.md). It also ranks with ``large_cosine_blend`` instead of
``cosine_blend`` (defaults 0.25 instead of 0; see Scoring).

Scoring: at the optimum of the SGNS loss, W[a] . C[b] = log P(a, b) / (P(a) Pn(b)) - log k, a
pointwise mutual information (Levy & Goldberg, 2014), with Pn the noise distribution (unigram^0.75)
and P(a, b) the distribution of the (subsampled) training pairs. A PMI ranks rare items high;
the next-item probability is what the evaluation (and a user) rewards, and
log P(b | a) = W[a] . C[b] + log Pn(b) - log keep(b) + const(a), keep(b) being b's subsampling
keep probability (subsampling thins b as a context). So the score is
``W[a] . C[b] + beta * (log Pn(b) - log keep(b))``: beta = 1 is the model's estimate of
log P(b | a) (up to a per-item constant that does not change the ranking), beta = 0 the raw PMI.
The top k comes from :func:`models.topk.top_k_scores` (exact, in row blocks, nothing n x n).

Cosine blend: with ``cosine_blend`` alpha > 0 an item's list is ranked by
``alpha * z(cos(W[a], W[b])) + (1 - alpha) * z(score(a, b))`` instead, each term standardised per
item a over all items (:func:`models.topk.top_k_blended`, as exact and blocked; W without its
constant bias column). The next-item score carries b's popularity; on a large catalog with a
long tail it pulls popular items into the lists of rare ones, while the cosine of the input
vectors ("users come to a and b from the same places") is blind to popularity. On small data
(every item seen often) the pure score ranks next items best, so the blend is a large-data
setting. Measured with 4 passes (bench/README.md): at 2M interactions / 40k items alpha 0.25
takes planted recall@5 from 0.664 to 0.720, next-item MRR@20 from 0.348 to 0.350 and Recall@20
from 0.601 to 0.588; at 5M / 100k planted recall@5 from 0.618 to 0.711 (gensim: 0.684).

Epochs: how many passes a fit makes is chosen on a validation split, not fixed
(:func:`validation_split`, :func:`chosen_pass`). The newest ``validation_share`` of the
interactions (by time) is cut off: a later window, as ``evaluate`` and the gate judge. A first
fit on the older ones is judged after each pass on the newer ones' next items (each user's
consecutive distinct items: MRR@``validation_k`` of the model's own ranking, at most
``validation_max_pairs`` pairs, :func:`reciprocal_ranks`, the ranks ``evaluate`` counts on the
top-k lists). The chosen count is the last pass not clearly worse than the best one (more than
one standard error of the paired difference below it): on a plateau the most passes, past
over-fitting the best. The first fit stops once ``validation_patience`` passes in a row are
clearly worse, or at ``validation_max_epochs``; then the model is fitted on all the
interactions with the chosen count, its rate decaying over exactly those passes. ``train``
gives the fit its input less the gate's window, so the cut lies before that window. (Whole users
held out at random instead chose worse: their next items lie in the fit's own days; README "How
many passes".) ``epochs`` is used as given when the split is off (``validation_share`` 0) or
holds fewer than ``validation_min_pairs`` pairs, and a warm start trains its update's epochs.
Not on large data (from ``large_data_items``): there the nightly time budget sets
``large_epochs`` passes; at 5M interactions a validation fit cost as much as the fit itself and
chose ``large_epochs`` anyway (bench/README.md). The metadata's ``validation`` records the
choice (the cut, MRR and Recall per pass, pairs, users, seconds) or why there was none. Cost:
the first fit's passes on top of the final one's.

Warm start (``warm_start=``:class:`WarmStart`, what ``update-model`` does every 15 minutes): the fit
starts from an earlier fit's tables instead of random ones and keeps its whole vocabulary; items
new in the interactions (with ``min_item_count`` of them) join it with fresh rows. It trains the
given ``fit_params`` (the earlier fit's negatives and ranking blend, the update's epochs) on the
given interactions only; the noise distribution comes from the earlier fit's token counts plus
those of the interactions after its ``data_end`` (a context overlap before it is trained on again
but not counted twice), so the sampled-softmax correction and the popularity prior stay those of
all the data. Items absent from
the new interactions keep their input vectors (lazy Adam touches only the rows of a batch).

Outputs: :attr:`NextItem2Vec.embeddings` (the input table, (n_items, dim) float32, what
``train`` saves), :attr:`NextItem2Vec.output_embeddings`, :attr:`NextItem2Vec.popularity_prior`
(what the scores are made of) and :attr:`NextItem2Vec.token_counts` (what the noise came from;
``train`` saves the last two tables for the next warm start); :meth:`recommend`;
:meth:`NextItem2Vec.top_k` (the index arrays, with any ``cosine_blend``); :meth:`metadata`
(version, hyperparameters, counts, loss, pairs and seconds per epoch, the effective
``fit_params`` (``epochs``: the passes made), the ``scoring``, the ``validation`` that chose the
passes and whether it was a ``warm_start``).

    model = build_model("next_item2vec", cfg.training.model).fit(interactions)
    ./spark-submit.sh train --input data/training/snapshots/<ts>      # the default model
    ./spark-submit.sh evaluate --input data/training/snapshots/<ts>   # compared with the others
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from carousel.config import ModelConfig
from models.base import ItemToItemModel
from models.interactions import Sequences, next_item_pairs, time_ns, user_sequences
from models.item2vec import (
    DEFAULT_PARAMS,
    EpochLog,
    _configure_threads,
    _SkipGramTrainer,
    initial_vectors,
    subsample_keep_probability,
    unigram_table,
)
from models.sampled_softmax import SampledSoftmaxTrainer
from models.topk import blend_tables, top_k_scores

__all__ = [
    "LARGE_DATA_KEYS",
    "VALIDATION_SETTINGS",
    "NextItem2Vec",
    "ValidationSplit",
    "WarmStart",
    "effective_params",
    "forward_pairs",
    "chosen_pass",
    "next_item_metrics",
    "popularity_prior",
    "reciprocal_ranks",
    "should_stop",
    "validation_split",
]

log = logging.getLogger(__name__)

_NOISE_POWER = 0.75  # word2vec's smoothing of the noise (negative-sampling) distribution
# Default replicas on large data: one per core, at most this many (quality measured with 2;
# merging many replicas' changes drifts further from sequential training). Small data: 1.
_MAX_DEFAULT_REPLICAS = 4

# On large data (see effective_params): parameter -> the ModelConfig key that replaces it.
LARGE_DATA_KEYS: dict[str, str] = {
    "epochs": "large_epochs",
    "sampled_negatives": "large_sampled_negatives",
    "cosine_blend": "large_cosine_blend",
}
_LARGE_DATA_SETTINGS = ("large_data_items", *LARGE_DATA_KEYS.values())
# How the fit chooses its passes (module docstring, "Epochs").
VALIDATION_SETTINGS = (
    "validation_share",
    "validation_max_epochs",
    "validation_patience",
    "validation_min_pairs",
    "validation_max_pairs",
    "validation_k",
)
# Without a ModelConfig these settings are ModelConfig's own defaults.
_CONFIG_DEFAULTS: dict[str, Any] = {
    key: ModelConfig.model_fields[key].default
    for key in ("cosine_blend", *_LARGE_DATA_SETTINGS, *VALIDATION_SETTINGS)
}
# Pairs scored at once by next_item_metrics: (block x items) float32 scores.
_SCORE_BLOCK_PAIRS = 256


@dataclass(frozen=True)
class WarmStart:
    """An earlier fit to continue from (see the module docstring).

    ``items``: its vocabulary (sorted ids); ``input_table`` (n, dim + bias column or dim) and
    ``output_table`` (n, dim + 1 or dim): its :attr:`NextItem2Vec.embeddings` and
    :attr:`NextItem2Vec.output_embeddings`; ``token_counts`` (n,): its
    :attr:`NextItem2Vec.token_counts`; ``fit_params``: what this fit trains and ranks with
    (the keys of :data:`LARGE_DATA_KEYS`); ``large_data``: whether the earlier fit was large;
    ``data_end``: the newest interaction the earlier fit counted. The interactions up to it (a
    context overlap) are trained on again but not counted again; None: all are new.
    """

    items: np.ndarray
    input_table: np.ndarray
    output_table: np.ndarray
    token_counts: np.ndarray
    fit_params: dict[str, Any]
    large_data: bool = False
    data_end: datetime | None = None

    def __post_init__(self) -> None:
        n = len(self.items)
        shapes = (self.input_table.shape[0], self.output_table.shape[0], len(self.token_counts))
        if shapes != (n, n, n):
            raise ValueError(
                f"warm start: {n} items, but tables of {shapes[0]} and {shapes[1]} rows and "
                f"{shapes[2]} token counts"
            )
        missing = sorted(set(LARGE_DATA_KEYS) - set(self.fit_params))
        if missing:
            raise ValueError(f"warm start: fit_params lacks {', '.join(missing)}")


def effective_params(params: dict[str, Any], n_sequence_items: int) -> tuple[dict[str, Any], bool]:
    """The hyperparameters a fit on ``n_sequence_items`` tokens uses, and whether they are the large ones.

    From ``params["large_data_items"]`` tokens on (0 = never) each key of :data:`LARGE_DATA_KEYS`
    takes the value of its ``large_*`` key; below, ``params`` are used as they are.
    """
    threshold = int(params.get("large_data_items", 0) or 0)
    if threshold <= 0 or n_sequence_items < threshold:
        return dict(params), False
    return {**params, **{key: params[large] for key, large in LARGE_DATA_KEYS.items()}}, True


def forward_pairs(
    codes: np.ndarray,
    user: np.ndarray,
    window: int,
    rng: np.random.Generator,
    keep_probability: np.ndarray | None = None,
    distance_decay: float = 1.0,
    backward_weight: float = 0.0,
    shuffle: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's directed pairs (earlier item, later item), vectorised over every user's sequence.

    ``codes``/``user``: the flat token array and each token's user (sorted by user, time order
    inside). Tokens are first down-sampled (``keep_probability`` per item); then each pair of
    positions at distance d in 1..``window`` of one user, with different items, is drawn with
    probability d ** -``distance_decay`` (distance 1 always). Returns int32 arrays (a, b).
    """
    if keep_probability is not None:
        kept = rng.random(len(codes)) < keep_probability[codes]
        codes, user = codes[kept], user[kept]
    sources: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for distance in range(1, min(window, len(codes) - 1) + 1):
        take = (user[distance:] == user[:-distance]) & (codes[:-distance] != codes[distance:])
        if distance > 1:
            take &= rng.random(len(take)) < float(distance) ** -distance_decay
        sources.append(codes[:-distance][take])
        targets.append(codes[distance:][take])
        if backward_weight > 0:
            back = take & (rng.random(len(take)) < backward_weight)
            sources.append(codes[distance:][back])
            targets.append(codes[:-distance][back])
    if not sources:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    source = np.concatenate(sources).astype(np.int32)
    target = np.concatenate(targets).astype(np.int32)
    if shuffle:
        order = rng.permutation(len(source))
        source, target = source[order], target[order]
    return source, target


@dataclass(frozen=True)
class ValidationSplit:
    """The tokens a validation fit trains on and the next-item pairs it is judged on.

    ``fit_codes``/``fit_user``: the tokens (and each one's user) before the cut; ``seeds`` and
    ``targets``: item codes of the pairs after it (each user's consecutive distinct items, at most
    ``max_pairs``, a seeded sample) whose two items are in the vocabulary; ``unknown``: the sampled
    pairs with an item outside it or with no token before the cut (misses, as ``evaluate`` counts
    them); ``users``: the users with items after the cut; ``cut``: its time (every interaction at
    that time is after it: with coarse times the newer part can be larger than the share).
    """

    fit_codes: np.ndarray
    fit_user: np.ndarray
    seeds: np.ndarray
    targets: np.ndarray
    unknown: int
    users: int
    cut: pd.Timestamp | None

    @property
    def pairs(self) -> int:
        return len(self.seeds) + self.unknown

    @property
    def fit_steps(self) -> int:
        """Steps from one token to the next of the same user before the cut."""
        return int((self.fit_user[1:] == self.fit_user[:-1]).sum()) if len(self.fit_user) else 0


def validation_split(
    interactions: pd.DataFrame,
    items: np.ndarray,
    share: float,
    seed: int,
    max_pairs: int,
    min_item_count: int = 1,
) -> ValidationSplit:
    """Cut off the newest ``share`` of the interactions (by time): the older ones to fit on, the
    newer ones' next-item pairs (:func:`models.interactions.next_item_pairs`, the pairs ``evaluate``
    scores; at most ``max_pairs``, sampled) to judge the fit. The fit's tokens are over the
    vocabulary ``items`` (the whole fit's, with its ``min_item_count``: an item seen only after
    the cut keeps an untrained row, as a new product would).
    """
    times = time_ns(interactions["event_time"])
    empty = np.zeros(0, np.int32)
    if share <= 0 or len(times) == 0:
        return ValidationSplit(empty, empty, empty, empty, 0, 0, None)
    cut_ns = np.sort(times)[min(len(times) - 1, int(len(times) * (1 - share)))]
    older = interactions[times < cut_ns]
    newer = interactions[times >= cut_ns]
    fit_codes, fit_user = empty, empty
    if len(older):
        fit = user_sequences(older, min_item_count, known_items=items)
        # Counts on either side are at most the whole fit's: its vocabulary exactly.
        assert fit.n_items == len(items)
        fit_codes, fit_user = fit.codes, fit.user_of_token()
    a_items, b_items = next_item_pairs(newer)
    if len(a_items) > max_pairs:
        chosen = np.sort(np.random.default_rng([seed, 0x5EED]).choice(len(a_items), max_pairs, replace=False))
        a_items, b_items = a_items[chosen], b_items[chosen]
    vocabulary = pd.Index(pd.Series(items, dtype=object).astype(str))
    seeds = vocabulary.get_indexer(pd.Series(a_items, dtype=object).astype(str))
    targets = vocabulary.get_indexer(pd.Series(b_items, dtype=object).astype(str))
    # An item with no token before the cut is not in the validation fit: a miss, as an item new
    # after the training window is in evaluate (it is never ranked either: reciprocal_ranks).
    seen = np.bincount(fit_codes, minlength=len(items)) > 0
    known = (seeds >= 0) & (targets >= 0)
    known[known] &= seen[seeds[known]] & seen[targets[known]]
    return ValidationSplit(
        fit_codes,
        fit_user,
        seeds[known].astype(np.int32),
        targets[known].astype(np.int32),
        int((~known).sum()),
        int(newer["user_id"].nunique()),
        pd.Timestamp(cut_ns, tz="UTC"),
    )


def next_item_metrics(
    queries: np.ndarray,
    keys: np.ndarray,
    key_bias: np.ndarray | None,
    seeds: np.ndarray,
    targets: np.ndarray,
    k: int,
) -> dict[str, float]:
    """Recall@k and MRR@k of next-item pairs (seed, target) under the scores
    ``queries[i] . keys[j] + key_bias[j]`` (the seed itself excluded), as ``evaluate`` counts them
    on top-k lists: the target's rank is one more than the items scored above it. Exact, in
    blocks of pairs (never pairs x items at once)."""
    reciprocal = reciprocal_ranks(queries, keys, key_bias, seeds, targets, k)
    if len(reciprocal) == 0:
        return {"recall": float("nan"), "mrr": float("nan")}
    return {"recall": float((reciprocal > 0).mean()), "mrr": float(reciprocal.mean())}


def reciprocal_ranks(
    queries: np.ndarray,
    keys: np.ndarray,
    key_bias: np.ndarray | None,
    seeds: np.ndarray,
    targets: np.ndarray,
    k: int,
    unranked: np.ndarray | None = None,
) -> np.ndarray:
    """Each pair's 1 / rank of its target when ranked <= ``k``, else 0 (see :func:`next_item_metrics`).

    ``unranked`` (n,) bool: items never ranked (not in the model being judged). A target whose
    score is not finite (a diverged fit) is a miss.
    """
    queries = np.asarray(queries, np.float32)
    keys_t = np.ascontiguousarray(np.asarray(keys, np.float32).T)
    bias = None if key_bias is None else np.asarray(key_bias, np.float32).copy()
    if unranked is not None and unranked.any():
        bias = np.zeros(keys_t.shape[1], np.float32) if bias is None else bias
        bias[unranked] = -np.inf
    reciprocal = np.zeros(len(seeds))
    for start in range(0, len(seeds), _SCORE_BLOCK_PAIRS):
        seed_block = seeds[start : start + _SCORE_BLOCK_PAIRS]
        target_block = targets[start : start + _SCORE_BLOCK_PAIRS]
        scores = queries[seed_block] @ keys_t
        if bias is not None:
            scores += bias
        rows = np.arange(len(seed_block))
        scores[rows, seed_block] = -np.inf
        own = scores[rows, target_block][:, None]
        # Ties go to the lower index, as in the top-k lists (models.topk).
        lower = np.arange(scores.shape[1])[None, :] < target_block[:, None]
        rank = 1 + ((scores > own) | ((scores == own) & lower)).sum(axis=1)
        ranked = (rank <= k) & np.isfinite(own[:, 0])
        reciprocal[start : start + len(seed_block)] = np.where(ranked, 1.0 / rank, 0.0)
    return reciprocal


def should_stop(worse: list[bool], patience: int) -> bool:
    """Whether the validation fit stops: its last ``patience`` passes were all clearly worse than
    the best one (:func:`chosen_pass`)."""
    return len(worse) >= patience and all(worse[-patience:])


def chosen_pass(reciprocal_by_pass: list[np.ndarray]) -> tuple[int, list[bool]]:
    """The pass count to fit with, from each pass's reciprocal ranks of the same validation pairs:
    the last pass not clearly worse than the best one; and, per pass, whether it is clearly worse.

    "Clearly worse": its MRR is below the best pass's by more than one standard error of the
    paired difference (the same pairs are scored after every pass). On a plateau, where the
    passes differ by noise, this takes the most passes (the fit on all interactions decays its
    rate over them, as the validation fit's had not yet); past the point where the newer part's
    next items get worse, it takes the best.
    """
    means = [float(r.mean()) for r in reciprocal_by_pass]
    best = reciprocal_by_pass[int(np.argmax(means))]
    worse = []
    for ranks in reciprocal_by_pass:
        gap = best - ranks
        error = float(gap.std(ddof=1)) / np.sqrt(len(gap)) if len(gap) > 1 else 0.0
        worse.append(bool(float(gap.mean()) > error))
    return 1 + max(i for i, clearly in enumerate(worse) if not clearly), worse


def popularity_prior(counts: np.ndarray, keep_probability: np.ndarray) -> np.ndarray:
    """log Pn(b) - log keep(b) per item: what turns the SGNS logit into log P(b | a) (float32).

    Pn is the unigram^0.75 noise distribution of the token ``counts``; ``keep_probability`` is each
    item's subsampling keep probability (all ones without subsampling). Items never seen get the
    smallest prior of the seen ones.
    """
    counts = np.asarray(counts, dtype=np.float64)
    weights = counts**_NOISE_POWER
    total = weights.sum()
    seen = counts > 0
    prior = np.full(len(counts), 0.0)
    if total > 0 and seen.any():
        prior[seen] = np.log(weights[seen] / total) - np.log(np.asarray(keep_probability, np.float64)[seen])
        prior[~seen] = prior[seen].min()
    return prior.astype(np.float32)


class NextItem2Vec(ItemToItemModel):
    """Directed SGNS over users' item sequences; recommendations by the model's next-item score
    (blended with the input vectors' cosine when ``cosine_blend`` / ``large_cosine_blend`` > 0).

    See the module docstring for the scoring. Keyword options on top of
    :class:`~carousel.config.ModelConfig`: ``distance_decay`` (default 1.0), ``popularity_weight``
    (beta, default 1.0), ``negative_sharing`` (default 8), ``threads`` (TensorFlow intra-op
    threads, default all cores), ``replicas`` (tables training at once; default on large data one
    per core up to 4, else 1) and ``chunk_steps`` (steps per compiled chunk and between merges,
    default 128).
    """

    name: ClassVar[str] = "next_item2vec"
    config_keys: ClassVar[tuple[str, ...]] = (
        "embedding_dim",
        "window",
        "negatives",
        "epochs",
        "batch_size",
        "learning_rate",
        "min_item_count",
        "subsample",
        "seed",
        "cosine_blend",
        *_LARGE_DATA_SETTINGS,
        *VALIDATION_SETTINGS,
    )

    def __init__(
        self,
        model_cfg: ModelConfig | None = None,
        distance_decay: float = 1.0,
        popularity_weight: float = 1.0,
        negative_sharing: int = 8,
        output_bias: bool = True,
        backward_weight: float = 0.5,
        loss: str = "softmax",
        sampled_negatives: int = 512,
        decay_rate: bool = True,
        threads: int | None = None,
        replicas: int | None = None,
        chunk_steps: int = 128,
        warm_start: WarmStart | None = None,
        **params: Any,
    ) -> None:
        if distance_decay < 0:
            raise ValueError(f"distance_decay must be >= 0, got {distance_decay}")
        if popularity_weight < 0:
            raise ValueError(f"popularity_weight must be >= 0, got {popularity_weight}")
        if negative_sharing < 1:
            raise ValueError(f"negative_sharing must be >= 1, got {negative_sharing}")
        if loss not in ("softmax", "sgns"):
            raise ValueError(f"loss must be 'softmax' or 'sgns', got {loss!r}")
        if (replicas is not None and replicas < 1) or chunk_steps < 1:
            raise ValueError(f"need replicas >= 1 or None, chunk_steps >= 1; got {replicas}, {chunk_steps}")
        if sampled_negatives < 1 or not 0 <= backward_weight <= 1:
            raise ValueError(
                f"need sampled_negatives >= 1 and 0 <= backward_weight <= 1, "
                f"got {sampled_negatives} and {backward_weight}"
            )
        base = {} if model_cfg is not None else {**DEFAULT_PARAMS, **_CONFIG_DEFAULTS}
        options = {
            "distance_decay": float(distance_decay),
            "popularity_weight": float(popularity_weight),
            "negative_sharing": int(negative_sharing),
            "output_bias": bool(output_bias),
            "backward_weight": float(backward_weight),
            "loss": loss,
            "sampled_negatives": int(sampled_negatives),
            "decay_rate": bool(decay_rate),
        }
        super().__init__(model_cfg, **{**base, **params, **options})
        for key in ("cosine_blend", "large_cosine_blend"):
            if not 0 <= float(self.params[key]) <= 1:
                raise ValueError(f"{key} must be between 0 and 1, got {self.params[key]}")
        self.threads = threads
        self.replicas = replicas
        self.chunk_steps = chunk_steps
        self.warm_start = warm_start
        self.embeddings: np.ndarray | None = None
        self.output_embeddings: np.ndarray | None = None
        self.popularity_prior: np.ndarray | None = None
        self.token_counts: np.ndarray | None = None
        self._new_token_counts: np.ndarray | None = None
        self.epoch_log = EpochLog(self.name, log)
        self.large_data = False
        self.fit_params: dict[str, Any] = {}
        self.training_layout: dict[str, int] = {}
        self.validation: dict[str, Any] = {}
        self._interactions: pd.DataFrame | None = None

    def fit(self, interactions: pd.DataFrame) -> NextItem2Vec:
        try:
            return super().fit(interactions)
        finally:
            self._interactions = None  # the caller's frame, kept only for the validation split

    def _sequences(self, interactions: pd.DataFrame, min_item_count: int) -> Sequences:
        warm = self.warm_start
        self._new_token_counts = None
        # The frame the validation split cuts (Epochs); released after the fit.
        self._interactions = interactions
        if warm is None:
            return user_sequences(interactions, min_item_count=min_item_count)
        sequences = user_sequences(interactions, min_item_count=min_item_count, known_items=warm.items)
        if warm.data_end is not None:
            # The tokens after the earlier fit's data end, over the same vocabulary: what the
            # noise counts gain (the context before it was counted by that fit).
            newer = interactions[interactions["event_time"] > pd.Timestamp(warm.data_end)]
            newer = newer[newer["item_id"].astype(str).isin(set(sequences.items))]
            fresh = user_sequences(newer, known_items=sequences.items)
            assert fresh.n_items == sequences.n_items
            self._new_token_counts = np.bincount(fresh.codes, minlength=sequences.n_items)
        return sequences

    def _fit(self, sequences: Sequences) -> None:
        _configure_threads(self.threads)
        import tensorflow as tf

        warm = self.warm_start
        if warm is not None:
            p, self.large_data = {**self.params, **warm.fit_params}, warm.large_data
        else:
            p, self.large_data = effective_params(self.params, len(sequences.codes))
        self.fit_params = {key: p[key] for key in LARGE_DATA_KEYS}
        n, dim, seed = sequences.n_items, int(p["embedding_dim"]), int(p["seed"])

        token_counts = np.bincount(sequences.codes, minlength=n).astype(np.float64)
        initial_tables = None
        if warm is not None:
            if p["loss"] != "softmax":
                raise ValueError("next_item2vec: a warm start needs the sampled-softmax loss")
            # The earlier items' rows (all of them are in the vocabulary) and counts carry over.
            rows = np.searchsorted(sequences.items, warm.items)
            if self._new_token_counts is not None:
                token_counts = self._new_token_counts.astype(np.float64)
            token_counts[rows] += np.asarray(warm.token_counts, np.float64)
            start_w = initial_vectors(seed, n, dim)
            start_c = np.zeros((n, dim + 1), np.float32)
            start_w[rows] = np.asarray(warm.input_table, np.float32)[:, :dim]
            width = min(dim + 1, warm.output_table.shape[1])
            start_c[rows, :width] = np.asarray(warm.output_table, np.float32)[:, :width]
            initial_tables = (start_w, start_c)
        user = sequences.user_of_token()
        softmax = p["loss"] == "softmax"
        log.info(
            "next_item2vec: %d items, %d users, %d sequence items; dim %d, forward window %d "
            "(decay %g), negatives %d, batch %d, lr %g, subsample %g, backward pairs %g, seed %d, "
            "cosine blend %g; %s-data settings",
            n,
            sequences.n_users,
            len(sequences.codes),
            dim,
            int(p["window"]),
            float(p["distance_decay"]),
            int(p["sampled_negatives"]) if softmax else int(p["negatives"]),
            int(p["batch_size"]),
            float(p["learning_rate"]),
            float(p["subsample"]),
            float(p["backward_weight"]),
            seed,
            float(p["cosine_blend"]),
            "large" if self.large_data else "default",
        )
        if warm is not None:
            epochs = int(p["epochs"])
            self.validation = {"skipped": "a warm start trains the update's epochs"}
        else:
            epochs, self.validation = self._validated_epochs(tf, sequences, p)
            self.fit_params["epochs"] = epochs
        self.epoch_log = EpochLog(self.name, log)
        self.embeddings, self.output_embeddings, keep = self._train(
            tf, sequences.codes, user, n, p, epochs, token_counts, self.epoch_log, initial_tables
        )
        self.popularity_prior = popularity_prior(token_counts, keep)
        self.token_counts = token_counts
        if not (np.isfinite(self.embeddings).all() and np.isfinite(self.output_embeddings).all()):
            raise FloatingPointError(
                "next_item2vec: training diverged (non-finite embeddings); lower learning_rate"
            )

    def _validated_epochs(
        self, tf: Any, sequences: Sequences, p: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """The passes to fit with, chosen on a validation split (module docstring, "Epochs"), and
        what the choice saw (the metadata's ``validation``). Fixed ``p["epochs"]`` when the split
        is off or holds too few next-item pairs."""
        share, fixed = float(p["validation_share"]), int(p["epochs"])
        if share <= 0:
            return fixed, {"skipped": "validation_share 0: the configured epochs", "epochs": fixed}
        if self.large_data:
            # The nightly time budget sets the passes: at 5M interactions a validation fit doubled
            # the fit and chose large_epochs all the same (bench/README.md).
            return fixed, {"skipped": "large data: large_epochs passes, the time budget", "epochs": fixed}
        assert self._interactions is not None  # set by _sequences
        split = validation_split(
            self._interactions,
            sequences.items,
            share,
            int(p["seed"]),
            int(p["validation_max_pairs"]),
            int(p["min_item_count"]),
        )
        least = int(p["validation_min_pairs"])
        if min(len(split.seeds), split.fit_steps) < least:
            reason = (
                f"{len(split.seeds)} next-item pairs after the cut and {split.fit_steps} steps "
                f"before it (validation_min_pairs {least}): the configured {fixed} epochs"
            )
            log.info("next_item2vec: no validation split: %s", reason)
            return fixed, {"skipped": reason, "epochs": fixed}
        most = int(p["validation_max_epochs"])
        patience, k = int(p["validation_patience"]), int(p["validation_k"])
        alpha = float(p["cosine_blend"])
        n = sequences.n_items
        counts = np.bincount(split.fit_codes, minlength=n).astype(np.float64)
        by_pass: list[np.ndarray] = []
        started = time.perf_counter()

        def judge(epoch: int, tables: tuple[np.ndarray, np.ndarray], keep: np.ndarray) -> bool:
            queries, keys, bias, _ = self._ranking_tables(*tables, popularity_prior(counts, keep), alpha)
            ranks = reciprocal_ranks(queries, keys, bias, split.seeds, split.targets, k, counts == 0)
            by_pass.append(np.concatenate([ranks, np.zeros(split.unknown)]))  # unknown items: misses
            chosen, worse = chosen_pass(by_pass)
            log.info(
                "next_item2vec validation after pass %d/%d: MRR@%d %.4f, Recall@%d %.4f (chosen so far: %d)",
                epoch,
                most,
                k,
                by_pass[-1].mean(),
                k,
                (by_pass[-1] > 0).mean(),
                chosen,
            )
            return not should_stop(worse, patience)

        search_log = EpochLog(f"{self.name} (validation fit)", log)
        self._train(tf, split.fit_codes, split.fit_user, n, p, most, counts, search_log, None, judge)
        mrr = [float(r.mean()) for r in by_pass]
        chosen, _ = chosen_pass(by_pass)
        seconds = time.perf_counter() - started
        log.info(
            "next_item2vec: %d passes chosen on %d users' %d next-item pairs after %s (MRR@%d by pass: "
            "%s) in %.1f s; refitting on all of them",
            chosen,
            split.users,
            split.pairs,
            split.cut,
            k,
            ", ".join(f"{v:.4f}" for v in mrr),
            seconds,
        )
        return chosen, {
            "epochs": chosen,
            "share": share,
            "cut": None if split.cut is None else split.cut.isoformat(),
            "users": split.users,
            "pairs": split.pairs,
            "k": k,
            "max_epochs": most,
            "patience": patience,
            "mrr_by_epoch": [round(v, 6) for v in mrr],
            "recall_by_epoch": [round(float((r > 0).mean()), 6) for r in by_pass],
            "seconds": round(seconds, 3),
        }

    def _train(
        self,
        tf: Any,
        codes: np.ndarray,
        user: np.ndarray,
        n: int,
        p: dict[str, Any],
        epochs: int,
        token_counts: np.ndarray,
        epoch_log: EpochLog,
        initial_tables: tuple[np.ndarray, np.ndarray] | None = None,
        after_epoch: Callable[[int, tuple[np.ndarray, np.ndarray], np.ndarray], bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to ``epochs`` passes over the forward pairs of the tokens ``codes`` (each one's user
        in ``user``) with the noise of ``token_counts``; returns (input table, output table, each
        item's subsampling keep probability). ``after_epoch(pass, tables, keep)`` after each pass:
        False ends the training there."""
        dim, window, seed = int(p["embedding_dim"]), int(p["window"]), int(p["seed"])
        sharing = int(p["negative_sharing"])
        batch = -(-int(p["batch_size"]) // sharing) * sharing  # a whole number of groups
        decay = float(p["distance_decay"])
        keep = subsample_keep_probability(token_counts, float(p["subsample"]))
        softmax = p["loss"] == "softmax"
        noise = unigram_table(token_counts, power=_NOISE_POWER)
        log_q = None
        if softmax:
            # One set of sampled negatives for the whole batch (sampled softmax).
            sharing = batch = int(p["batch_size"])
            q = np.bincount(noise, minlength=n) / len(noise)
            log_q = np.log(np.maximum(q, 1e-12))
        trainer: Any = None
        if not softmax:
            trainer = _SkipGramTrainer(
                tf,
                n_items=n,
                dim=dim,
                negatives=int(p["negatives"]),
                sharing=sharing,
                batch=batch,
                rate=float(p["learning_rate"]),
                optimizer="adam",
                seed=seed,
                noise_table=noise,
                output_bias=bool(p["output_bias"]),
                decay_rate=bool(p["decay_rate"]),
            )
        # Replicas are a large-data throughput setting: small data trains one table set, exactly
        # sequential (its fit takes seconds; merging replicas costs a little quality there).
        default_replicas = min(_MAX_DEFAULT_REPLICAS, os.cpu_count() or 1) if self.large_data else 1
        try:
            for epoch in range(epochs):
                started = time.perf_counter()
                rng = np.random.default_rng([seed, epoch + 1])
                source, target = forward_pairs(
                    codes, user, window, rng, keep, decay, float(p["backward_weight"])
                )
                if trainer is None:  # sampled softmax: sized to the data, so built on the first epoch
                    trainer = SampledSoftmaxTrainer(
                        tf,
                        n_items=n,
                        dim=dim,
                        negatives=int(p["sampled_negatives"]),
                        batch=batch,
                        rate=float(p["learning_rate"]),
                        seed=seed,
                        noise_table=noise,
                        log_q=log_q,
                        output_bias=bool(p["output_bias"]),
                        decay_rate=bool(p["decay_rate"]),
                        pairs_per_epoch=len(source),
                        epochs=epochs,
                        replicas=self.replicas or default_replicas,
                        chunk_steps=self.chunk_steps,
                        initial_tables=initial_tables,
                    )
                    self.training_layout = {"replicas": trainer.replicas, "chunk_steps": trainer.chunk_steps}
                elif epoch == 0:
                    trainer.set_total_steps(epochs * -(-len(source) // batch))
                mean_loss = trainer.train_epoch(source, target)
                epoch_log.record(epochs, len(source), mean_loss, time.perf_counter() - started)
                if after_epoch is not None and not after_epoch(epoch + 1, trainer.tables(), keep):
                    break
            input_table, output_table = trainer.tables()
        finally:
            if isinstance(trainer, SampledSoftmaxTrainer):
                trainer.close()  # its replica threads
        return input_table, output_table, keep

    def _ranking_tables(
        self, input_table: np.ndarray, output_table: np.ndarray, prior: np.ndarray, cosine_blend: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(queries, keys, key bias or None, row offset or None): item j's score after item i is
        ``queries[i] . keys[j] + bias[j] - offset[i]`` in this model's ranking (module docstring,
        Scoring and Cosine blend; the offset never changes a row's order)."""
        weight = float(self.params["popularity_weight"])
        bias = weight * prior if self.params["loss"] != "softmax" else None
        if cosine_blend <= 0:
            return input_table, output_table, bias, None
        # The cosine of the input vectors proper: the output-bias column is a constant 1.
        inputs = input_table[:, :-1] if self.params["output_bias"] else input_table
        queries, keys, offset = blend_tables(input_table, output_table, inputs, cosine_blend, key_bias=bias)
        return queries, keys, None, offset

    def top_k(self, k: int, cosine_blend: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each item's k best other items by the model's ranking: (indices (n, k) int32, scores (n, k)).

        ``cosine_blend`` (0..1) overrides the blend the fit chose (``fit_params``), e.g. to compare
        rankings of one fit; None = the fit's. Codes index :attr:`item_ids`.
        """
        self._require_fitted()
        assert self.embeddings is not None and self.output_embeddings is not None
        assert self.popularity_prior is not None
        if cosine_blend is None:
            cosine_blend = float(self.fit_params.get("cosine_blend", 0.0))
        queries, keys, bias, offset = self._ranking_tables(
            self.embeddings, self.output_embeddings, self.popularity_prior, float(cosine_blend)
        )
        indices, scores = top_k_scores(queries, keys, k, key_bias=bias)
        return indices, scores if offset is None else scores - offset[:, None]

    def _top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.top_k(k)

    def _extra_metadata(self) -> dict[str, Any]:
        return {
            "large_data": self.large_data,
            "fit_params": dict(self.fit_params),
            "training_layout": dict(self.training_layout),
            **self.epoch_log.metadata(),
            "embedding_shape": list(self.embeddings.shape) if self.embeddings is not None else None,
            "warm_start": self.warm_start is not None,
            "validation": dict(self.validation),
            "scoring": (
                "input . output + popularity_weight * (log Pn - log keep)"
                if float(self.fit_params.get("cosine_blend", 0.0)) <= 0
                else "cosine_blend * z(cos(input, input)) + (1 - cosine_blend) * z(input . output + "
                "popularity_weight * (log Pn - log keep)), z: standardised per item"
            ),
        }
