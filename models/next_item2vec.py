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
``cosine_blend`` (the ranking, below); and the large-data settings ``large_data_items``,
``large_epochs``, ``large_sampled_negatives`` and ``large_cosine_blend`` (below).
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
negatives per batch instead (defaults 4 and 256 instead of 5 and 512): with ~50 interactions per
item every item is seen often enough in 4 passes. Larger batches with fewer negatives, no
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
``fit_params``, the ``scoring`` and whether it was a ``warm_start``).

    model = build_model("next_item2vec", cfg.training.model).fit(interactions)
    ./spark-submit.sh train --input data/training/snapshots/<ts>      # the default model
    ./spark-submit.sh evaluate --input data/training/snapshots/<ts>   # compared with the others
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from carousel.config import ModelConfig
from models.base import ItemToItemModel
from models.interactions import Sequences, user_sequences
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
from models.topk import top_k_blended, top_k_scores

__all__ = [
    "LARGE_DATA_KEYS",
    "NextItem2Vec",
    "WarmStart",
    "effective_params",
    "forward_pairs",
    "popularity_prior",
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
# Without a ModelConfig these settings are ModelConfig's own defaults.
_CONFIG_DEFAULTS: dict[str, Any] = {
    key: ModelConfig.model_fields[key].default for key in ("cosine_blend", *_LARGE_DATA_SETTINGS)
}


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

    def _sequences(self, interactions: pd.DataFrame, min_item_count: int) -> Sequences:
        warm = self.warm_start
        self._new_token_counts = None
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
        n, dim = sequences.n_items, int(p["embedding_dim"])
        window, epochs, seed = int(p["window"]), int(p["epochs"]), int(p["seed"])
        sharing = int(p["negative_sharing"])
        batch = -(-int(p["batch_size"]) // sharing) * sharing  # a whole number of groups
        decay = float(p["distance_decay"])

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
        user = sequences.user_of_token()
        log.info(
            "next_item2vec: %d items, %d users, %d sequence items; dim %d, forward window %d "
            "(decay %g), negatives %d (shared by %d), %d epochs, batch %d, lr %g, subsample %g, "
            "backward pairs %g, seed %d, cosine blend %g; %s-data settings",
            n,
            sequences.n_users,
            len(sequences.codes),
            dim,
            window,
            decay,
            int(p["sampled_negatives"]) if softmax else int(p["negatives"]),
            sharing,
            epochs,
            batch,
            float(p["learning_rate"]),
            float(p["subsample"]),
            float(p["backward_weight"]),
            seed,
            float(p["cosine_blend"]),
            "large" if self.large_data else "default",
        )
        # Replicas are a large-data throughput setting: small data trains one table set, exactly
        # sequential (its fit takes seconds; merging replicas costs a little quality there).
        default_replicas = min(_MAX_DEFAULT_REPLICAS, os.cpu_count() or 1) if self.large_data else 1
        self.epoch_log = EpochLog(self.name, log)
        try:
            for epoch in range(epochs):
                started = time.perf_counter()
                rng = np.random.default_rng([seed, epoch + 1])
                source, target = forward_pairs(
                    sequences.codes, user, window, rng, keep, decay, float(p["backward_weight"])
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
                self.epoch_log.record(epochs, len(source), mean_loss, time.perf_counter() - started)
            self.embeddings, self.output_embeddings = trainer.tables()
        finally:
            if isinstance(trainer, SampledSoftmaxTrainer):
                trainer.close()  # its replica threads
        self.popularity_prior = popularity_prior(token_counts, keep)
        self.token_counts = token_counts
        if not (np.isfinite(self.embeddings).all() and np.isfinite(self.output_embeddings).all()):
            raise FloatingPointError(
                "next_item2vec: training diverged (non-finite embeddings); lower learning_rate"
            )

    def top_k(self, k: int, cosine_blend: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each item's k best other items by the model's ranking: (indices (n, k) int32, scores (n, k)).

        ``cosine_blend`` (0..1) overrides the blend the fit chose (``fit_params``), e.g. to compare
        rankings of one fit; None = the fit's. Codes index :attr:`item_ids`.
        """
        self._require_fitted()
        assert self.embeddings is not None and self.output_embeddings is not None
        assert self.popularity_prior is not None
        weight = float(self.params["popularity_weight"])
        bias = weight * self.popularity_prior if self.params["loss"] != "softmax" else None
        if cosine_blend is None:
            cosine_blend = float(self.fit_params.get("cosine_blend", 0.0))
        alpha = float(cosine_blend)
        if alpha <= 0:
            return top_k_scores(self.embeddings, self.output_embeddings, k, key_bias=bias)
        # The cosine of the input vectors proper: the output-bias column is a constant 1.
        inputs = self.embeddings[:, :-1] if self.params["output_bias"] else self.embeddings
        return top_k_blended(self.embeddings, self.output_embeddings, inputs, k, alpha, key_bias=bias)

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
            "scoring": (
                "input . output + popularity_weight * (log Pn - log keep)"
                if float(self.fit_params.get("cosine_blend", 0.0)) <= 0
                else "cosine_blend * z(cos(input, input)) + (1 - cosine_blend) * z(input . output + "
                "popularity_weight * (log Pn - log keep)), z: standardised per item"
            ),
        }
