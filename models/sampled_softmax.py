"""The sampled-softmax training loop of :class:`models.next_item2vec.NextItem2Vec` (TensorFlow, XLA).

Role: train the two embedding tables of a directed item-to-item model on (source, target) pairs
as fast as two CPU cores allow. Inputs: the pairs of each epoch (int32 arrays, shuffled by the
caller), the unigram^0.75 noise table and its log-probabilities, hyperparameters. Outputs:
:meth:`SampledSoftmaxTrainer.tables`: the input table W (with a constant 1 column when the
output bias is on) and the output table C (with the bias column), as
:class:`models.item2vec._SkipGramTrainer` returns them, so the scoring is unchanged.

The step (one batch of B pairs): K negatives drawn in-graph (stateless, keyed by (seed, replica,
step)) and shared by the whole batch; logits ``w . c + bias(c) - log q(c)`` (the logQ correction,
so that they estimate log P(target | source)); an accidental hit (a negative that is the pair's
own target) is masked; softmax cross-entropy; the gradients of the gathered rows written out by
hand; a lazy Adam step (only the rows of the batch move), the rate decaying linearly to a small
share over the fit. The draw, the gradients and the Adam rows are the module's functions
(:func:`draw_negatives`, :func:`sampled_softmax_gradients`, :func:`adam_rows`), which the chunk
loop calls and ``tests/test_gradients.py`` checks against ``tf.GradientTape``,
``tf.nn.sampled_softmax_loss`` and Keras's Adam.

Why it is fast:

* **Whole chunks in one XLA computation.** ``chunk_steps`` steps run in one compiled
  ``while`` loop: no per-step dispatch. Lazy Adam needs each row's gradients summed once, i.e.
  the distinct rows of the batch; ``tf.unique`` has a dynamic shape and cannot be compiled, so
  :func:`unique_rows` finds them with a stable sort into a fixed-size, padded array instead.
* **One row per item and side.** A table row holds the parameters and both Adam moments
  (``[param | m | v]``): one gather and one scatter per step and side instead of three.
* **Both cores busy.** One XLA computation keeps about 1.25 cores busy (the matrix products use
  two threads, the gathers, scatters and element-wise loops one), and TensorFlow serialises
  computations that update the same variables. So ``replicas`` (default: one per core) copies of
  the tables train at once on disjoint shares of the batches, one thread each, and every
  ``chunk_steps`` steps they are merged: every replica's change since the last merge is added
  to the common state (``base + sum(replica - base)``), as if the replicas' steps had run one
  after another. Merging at fixed points keeps a fit reproducible for a seed and replica count.

Memory: one copy of the state is 4 bytes x (3 dim + 3 (dim + 1)) per item, ≈ 1.5 KB at dim 64;
with R > 1 replicas there are R + 1 copies (the replicas and the merge base): ≈ 0.47 GB for
100k items and 2 replicas, ≈ 4.7 GB for 1M items (``replicas=1`` keeps one copy).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from models.item2vec import initial_vectors

__all__ = [
    "SampledSoftmaxTrainer",
    "adam_rows",
    "draw_negatives",
    "sampled_softmax_gradients",
    "unique_rows",
]

log = logging.getLogger(__name__)

_ADAM_BETA1 = 0.9
_ADAM_BETA2 = 0.999
_ADAM_EPSILON = 1e-7
_MIN_RATE_SHARE = 1e-4  # the rate decays linearly down to this share of the start
_MASKED_LOGIT = -1e9
_REPLICA_SEED_STRIDE = 1_000_003  # replica r draws its negatives with seed + r * this


def unique_rows(tf: Any, index: Any, pad: int) -> tuple[Any, Any]:
    """The distinct values of a 1-D int32 tensor in a fixed shape (XLA-compilable).

    Returns ``(unique, position)``, both the length of ``index``: ``unique`` holds the distinct
    values in ascending order, then ``pad`` in the unused slots; ``position[i]`` is the slot of
    ``index[i]`` in ``unique``, so ``unique[position] == index``.
    """
    size = index.shape[0]
    order = tf.argsort(index, stable=True)
    ordered = tf.gather(index, order)
    first = tf.concat([[True], ordered[1:] != ordered[:-1]], 0)
    slot = tf.cumsum(tf.cast(first, tf.int32)) - 1
    position = tf.scatter_nd(order[:, None], slot, [size])
    # Every copy of a value writes the same value into its slot.
    unique = tf.tensor_scatter_nd_update(tf.fill([size], pad), slot[:, None], ordered)
    return unique, position


def draw_negatives(tf: Any, seed: Any, replica: Any, step: Any, k: int, table_size: int) -> Any:
    """The noise-table slots of one step's ``k`` negatives (int32), drawn statelessly.

    ``seed``, ``replica`` and ``step`` are int64 scalars: each replica has its own stream, keyed
    by (seed + replica * stride, step), so a fit is reproducible for a seed and replica count.
    """
    key = tf.stack([seed + replica * _REPLICA_SEED_STRIDE, step])
    return tf.random.stateless_uniform([k], seed=key, minval=0, maxval=table_size, dtype=tf.int32)


def sampled_softmax_gradients(
    tf: Any,
    w: Any,
    c_all: Any,
    target: Any,
    noise: Any,
    log_q_table: Any,
    valid: Any,
    bias_on: float,
) -> tuple[Any, Any, Any]:
    """One batch's sampled-softmax loss and the hand-written gradients of its gathered rows.

    ``w`` (B, d): each pair's input row; ``c_all`` (B + K, d + 1): each pair's target output row,
    then the K shared negatives' rows, the bias in the last column; ``target`` (B,) and ``noise``
    (K,): their item codes (a negative equal to the pair's own target, an accidental hit, is
    masked); ``log_q_table``: log q of every code (the logQ correction); ``valid`` (B,): 1 for a
    real pair, 0 for padding; ``bias_on``: 1.0 to use the bias column, 0.0 to ignore it.

    The loss is the mean over valid pairs of softmax cross-entropy over [target, negatives] on
    logits ``w . c + bias_on * bias - log q``. Returns ``(loss_sum, grad_w (B, d), grad_c_all
    (B + K, d + 1))``: the loss summed over valid pairs (not averaged) and the gradients of the
    mean loss with respect to each gathered row (a row gathered twice gets two gradients, for
    the caller to sum). Written out by hand rather than by ``tf.GradientTape``: the training
    step is one XLA computation, and this is what ``tests/test_gradients.py`` checks against
    the tape and ``tf.nn.sampled_softmax_loss``.
    """
    batch, dim = w.shape[0], w.shape[1]
    scale = valid / tf.maximum(tf.reduce_sum(valid), 1.0)
    c, neg = c_all[:batch, :dim], c_all[batch:, :dim]
    c_bias, neg_bias = c_all[:batch, dim], c_all[batch:, dim]
    pos_logit = tf.reduce_sum(w * c, 1) + bias_on * c_bias - tf.gather(log_q_table, target)
    neg_logit = (
        tf.matmul(w, neg, transpose_b=True) + (bias_on * neg_bias - tf.gather(log_q_table, noise))[None, :]
    )
    neg_logit = tf.where(tf.equal(noise[None, :], target[:, None]), _MASKED_LOGIT, neg_logit)
    log_norm = tf.reduce_logsumexp(tf.concat([pos_logit[:, None], neg_logit], 1), 1)  # (B,)
    loss_sum = tf.reduce_sum((log_norm - pos_logit) * valid)
    g_pos = (tf.exp(pos_logit - log_norm) - 1.0) * scale  # d loss / d logit, (B,)
    g_neg = tf.exp(neg_logit - log_norm[:, None]) * scale[:, None]  # (B, K)
    grad_w = g_pos[:, None] * c + tf.matmul(g_neg, neg)
    grad_c = tf.concat([g_pos[:, None] * w, bias_on * g_pos[:, None]], 1)
    grad_neg = tf.concat(
        [tf.matmul(g_neg, w, transpose_a=True), bias_on * tf.reduce_sum(g_neg, 0)[:, None]], 1
    )
    return loss_sum, grad_w, tf.concat([grad_c, grad_neg], 0)


def adam_rows(tf: Any, state: Any, width: int, summed: Any, lr: Any) -> Any:
    """One Adam step of some rows held as ``[param | m | v]`` (``width`` columns each).

    ``summed``: each row's gradient, summed over its occurrences in the batch; ``lr``: the rate
    with Adam's bias correction for this step already applied. Only the rows given move (lazy
    Adam): the caller gathers the batch's distinct rows and scatters the result back.
    """
    param, m, v = state[:, :width], state[:, width : 2 * width], state[:, 2 * width :]
    m = _ADAM_BETA1 * m + (1 - _ADAM_BETA1) * summed
    v = _ADAM_BETA2 * v + (1 - _ADAM_BETA2) * tf.square(summed)
    return tf.concat([param - lr * m / (tf.sqrt(v) + _ADAM_EPSILON), m, v], 1)


class SampledSoftmaxTrainer:
    """Tables, Adam state and the compiled chunk loop for each of ``replicas`` copies.

    Tables have one extra row (index ``n_items``): the padding of an epoch's last chunk points
    there, so every chunk has one shape (one compilation) and padding touches no item.
    """

    def __init__(
        self,
        tf: Any,
        *,
        n_items: int,
        dim: int,
        negatives: int,
        batch: int,
        rate: float,
        seed: int,
        noise_table: np.ndarray,
        log_q: np.ndarray,
        output_bias: bool = True,
        decay_rate: bool = True,
        pairs_per_epoch: int,
        epochs: int,
        replicas: int = 1,
        chunk_steps: int = 128,
        initial_tables: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        if min(replicas, chunk_steps, negatives, batch, epochs) < 1:
            raise ValueError(
                f"need replicas, chunk_steps, negatives, batch and epochs >= 1, "
                f"got {replicas}, {chunk_steps}, {negatives}, {batch} and {epochs}"
            )
        # Sized to the data: no more replicas than an epoch has batches, no longer chunks than
        # each replica's share of an epoch (padding steps cost as much as real ones).
        steps = max(1, -(-int(pairs_per_epoch) // batch))
        replicas = min(replicas, steps)
        chunk_steps = min(chunk_steps, -(-steps // replicas))
        self.tf = tf
        self.n = n_items
        self.dim = dim
        self.batch = batch
        self.replicas = replicas
        self.chunk_steps = chunk_steps
        self.output_bias = output_bias
        rows = n_items + 1
        pad = n_items
        width_w, width_c = dim, dim + 1  # the output side carries its bias column
        init = initial_vectors(seed, rows, dim)  # as models.item2vec's trainer: the same start
        context_init = np.zeros((rows, 3 * width_c), np.float32)
        if initial_tables is not None:
            # A warm start: the vectors of an earlier fit (the bias column of the input side
            # dropped); Adam's moments start at zero, as after any fresh start.
            start_w, start_c = (np.asarray(table, np.float32) for table in initial_tables)
            if start_w.shape[0] != n_items or start_c.shape[0] != n_items or start_w.shape[1] < dim:
                raise ValueError(
                    f"initial tables of shapes {start_w.shape} and {start_c.shape} do not fit "
                    f"{n_items} items of dimension {dim}"
                )
            init[:n_items] = start_w[:, :dim]
            context_init[:n_items, : min(width_c, start_c.shape[1])] = start_c[:, :width_c]
        target_init = np.concatenate([init, np.zeros((rows, 2 * width_w), np.float32)], axis=1)
        # The state every replica starts each chunk from (only kept when there is more than one).
        self.base = (
            (tf.Variable(target_init, name="w_base"), tf.Variable(context_init, name="c_base"))
            if replicas > 1
            else None
        )
        self.states = [
            (tf.Variable(target_init, name=f"w_{r}"), tf.Variable(context_init, name=f"c_{r}"))
            for r in range(replicas)
        ]
        self.steps = [tf.Variable(0, dtype=tf.int64, trainable=False) for _ in range(replicas)]
        # The rate schedule: each replica's steps over the whole fit.
        total_steps = tf.constant(float(epochs * -(-steps // replicas)), tf.float32)
        table = tf.constant(noise_table)
        table_size = len(noise_table)
        log_q_table = tf.constant(np.concatenate([np.asarray(log_q, np.float32), [0.0]]).astype(np.float32))
        bias_on = 1.0 if output_bias else 0.0
        seed_t = tf.constant(seed, tf.int64)
        k = negatives

        def make_chunk(replica: int) -> Any:
            target_var, context_var = self.states[replica]
            step_var = self.steps[replica]
            stream = tf.constant(replica, tf.int64)

            def one_step(source: Any, target: Any) -> Any:
                valid = tf.cast(source < pad, tf.float32)  # (B,)
                # Only steps with pairs count: the padded tail of an epoch leaves the schedule alone.
                step_var.assign_add(tf.cast(source[0] < pad, tf.int64))
                step = step_var.read_value()
                t = tf.maximum(tf.cast(step, tf.float32), 1.0)
                draw = draw_negatives(tf, seed_t, stream, step, k, table_size)  # a stream per replica
                noise = tf.where(tf.reduce_max(valid) > 0, tf.gather(table, draw), pad)  # (K,)
                w_unique, w_slot = unique_rows(tf, source, pad)
                c_unique, c_slot = unique_rows(tf, tf.concat([target, noise], 0), pad)
                w_state = tf.gather(target_var, w_unique)  # (B, 3 width_w)
                c_state = tf.gather(context_var, c_unique)  # (B + K, 3 width_c)
                w = tf.gather(w_state[:, :width_w], w_slot)  # (B, d)
                c_all = tf.gather(c_state[:, :width_c], c_slot)  # (B + K, d + 1)
                loss_sum, grad_w, grad_c_all = sampled_softmax_gradients(
                    tf, w, c_all, target, noise, log_q_table, valid, bias_on
                )
                lr = rate * tf.sqrt(1 - _ADAM_BETA2**t) / (1 - _ADAM_BETA1**t)
                if decay_rate:  # linearly down to a small share of the rate: a fine last pass
                    lr = lr * tf.maximum(_MIN_RATE_SHARE, 1.0 - tf.minimum(1.0, t / total_steps))
                w_sum = tf.math.unsorted_segment_sum(grad_w, w_slot, self.batch)
                c_sum = tf.math.unsorted_segment_sum(grad_c_all, c_slot, self.batch + k)
                target_var.scatter_update(
                    tf.IndexedSlices(adam_rows(tf, w_state, width_w, w_sum, lr), w_unique)
                )
                context_var.scatter_update(
                    tf.IndexedSlices(adam_rows(tf, c_state, width_c, c_sum, lr), c_unique)
                )
                return loss_sum

            spec = tf.TensorSpec([chunk_steps, batch], tf.int32)

            @tf.function(input_signature=[spec, spec], jit_compile=True)
            def run_chunk(sources: Any, targets: Any) -> Any:
                total = tf.constant(0.0, tf.float32)
                for i in tf.range(chunk_steps):
                    total += one_step(sources[i], targets[i])
                return total

            return run_chunk

        self._chunks = [make_chunk(r) for r in range(replicas)]
        self._merge = self._make_merge(width_w, width_c) if replicas > 1 else None
        # One thread per replica; a single replica runs on the caller's thread.
        self._pool: ThreadPoolExecutor | None = None
        if replicas > 1:
            self._pool = ThreadPoolExecutor(max_workers=replicas, thread_name_prefix="sampled-softmax")

    def _make_merge(self, width_w: int, width_c: int) -> Any:
        tf = self.tf
        assert self.base is not None

        @tf.function(jit_compile=True)
        def merge() -> Any:
            for side, width in ((0, width_w), (1, width_c)):
                base = self.base[side]
                merged = base.read_value()
                start = merged
                for state in self.states:
                    merged += state[side].read_value() - start
                # Adam's second moment stays >= 0 (a sum of decayed changes could undershoot).
                merged = tf.concat([merged[:, : 2 * width], tf.maximum(merged[:, 2 * width :], 0.0)], 1)
                base.assign(merged)
                for state in self.states:
                    state[side].assign(merged)
            return tf.constant(0)

        return merge

    def train_epoch(self, source: np.ndarray, target: np.ndarray) -> float:
        """One pass over these (shuffled) pairs; returns the mean loss per pair."""
        pairs = len(source)
        if pairs == 0:
            return float("nan")
        per_chunk = self.batch * self.chunk_steps
        # Replica r takes every replicas-th chunk; the last round is padded to whole chunks.
        chunks = -(-pairs // per_chunk)
        rounds = -(-chunks // self.replicas)
        padded = rounds * self.replicas * per_chunk
        shape = (rounds, self.replicas, self.chunk_steps, self.batch)
        sources = np.concatenate([source, np.full(padded - pairs, self.n, np.int32)]).reshape(shape)
        targets = np.concatenate([target, np.full(padded - pairs, self.n, np.int32)]).reshape(shape)
        total = 0.0
        for i in range(rounds):
            if self._pool is None:
                total += float(self._chunks[0](sources[i, 0], targets[i, 0]))
                continue
            # Empty chunks of the last round are skipped (all padding).
            work = [r for r in range(self.replicas) if sources[i, r, 0, 0] < self.n]
            futures = [self._pool.submit(self._run, r, sources[i, r], targets[i, r]) for r in work]
            total += sum(future.result() for future in futures)
            self._merge()
        return total / pairs

    def _run(self, replica: int, sources: np.ndarray, targets: np.ndarray) -> float:
        return float(self._chunks[replica](sources, targets))

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(input table, output table) without the padding row, float32.

        With the output bias on, the input table ends with a constant 1 column and the output
        table with the bias, so that ``W @ C.T`` includes the bias; without it, (n, dim) each.
        """
        target, context = (v.numpy() for v in self.states[0])
        w, c = target[: self.n, : self.dim], context[: self.n, : self.dim + 1]
        if not self.output_bias:
            return w, c[:, : self.dim]
        return np.concatenate([w, np.ones((self.n, 1), np.float32)], axis=1), c

    def close(self) -> None:
        """Stop the replica threads (if any)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
