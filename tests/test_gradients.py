"""The hand-written gradients and lazy Adam of the training loops, against TensorFlow's own.

The skip-gram trainer (:class:`models.item2vec._SkipGramTrainer`, behind ``item2vec`` and
``next_item2vec``'s ``loss="sgns"``) and the sampled-softmax trainer
(:mod:`models.sampled_softmax`, behind the default ``next_item2vec``) write their gradients out
by hand and move only the rows of a batch (lazy Adam): that is their speed. Here, on tiny tables
with fixed seeds, the very functions training runs are compared with ``tf.GradientTape`` on the
same loss, written with TensorFlow's own losses (``tf.nn.sigmoid_cross_entropy_with_logits``,
``tf.nn.sampled_softmax_loss`` with the same sampled candidates), and one training step with
Keras's Adam (or plain SGD) applied to the tape's gradients. The tables start random (the
trainers start the output table at zero, where the input side's gradient vanishes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models.item2vec import _SkipGramTrainer
from models.sampled_softmax import (
    SampledSoftmaxTrainer,
    draw_negatives,
    sampled_softmax_gradients,
)

N_ITEMS = 6
DIM = 3
RATE = 0.05
BETA1, BETA2, EPSILON = 0.9, 0.999, 1e-7  # Adam's, as both trainers use them
# The negatives' noise table: item i fills NOISE_SLOTS[i] slots (small: it is an XLA constant).
NOISE_SLOTS = [5, 3, 4, 2, 6, 1]
NOISE_TABLE = np.repeat(np.arange(N_ITEMS, dtype=np.int32), NOISE_SLOTS)


@pytest.fixture(scope="module")
def tf() -> Any:
    import tensorflow

    return tensorflow


def dense(tf: Any, gradient: Any) -> np.ndarray:
    """A tape gradient (dense, or IndexedSlices from a gather) as a numpy array."""
    return tf.convert_to_tensor(gradient).numpy()


def scattered(rows: np.ndarray, grads: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-occurrence row gradients summed into a table of ``shape`` (duplicates add up)."""
    table = np.zeros(shape, grads.dtype)
    np.add.at(table, np.asarray(rows), grads)
    return table


# Float32 moments' absolute tolerances (m, v): a first moment near 0 is a sum that cancels (an
# error ~5e-9 of terms ~0.05); v = 0.001 g^2 errs ~2e-3 g dg.
MOMENT_ATOL = (1e-8, 1e-11)


def adam_moments(gradient: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adam's first and second moments after one step from zero."""
    return (1 - BETA1) * gradient, (1 - BETA2) * gradient**2


# ---------------------------------------------------------------------------------------------
# Skip-gram with negative sampling (item2vec; next_item2vec with loss="sgns")
# ---------------------------------------------------------------------------------------------
SGNS_BATCH, SGNS_SHARING, SGNS_NEGATIVES = 6, 2, 3
# Two steps of (targets, contexts), repeated items on both sides. Step 1 has five real pairs (the
# batch's sixth slot is padding), step 2 four (its third group of two is all padding); target 3
# is only in step 1, so lazy Adam leaves its row alone in step 2.
SGNS_STEPS = [
    (np.array([0, 1, 2, 3, 0], np.int32), np.array([1, 2, 0, 4, 1], np.int32)),
    (np.array([4, 1, 0, 5], np.int32), np.array([0, 3, 2, 2], np.int32)),
]


def lazily(before: np.ndarray, dense_after: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The table after a lazy step: ``rows`` as the dense optimizer left them, the rest as before."""
    table = before.copy()
    rows = np.unique(rows)
    table[rows] = dense_after[rows]
    return table


@pytest.mark.parametrize(
    ("optimizer", "output_bias", "decay_rate"),
    [
        ("adam", False, False),  # item2vec
        ("adam", True, True),  # next_item2vec, loss="sgns"
        ("sgd", False, False),  # item2vec, optimizer="sgd"
    ],
)
def test_skipgram_gradients_and_steps_match_gradient_tape(
    tf: Any, optimizer: str, output_bias: bool, decay_rate: bool
) -> None:
    import keras

    trainer = _SkipGramTrainer(
        tf,
        n_items=N_ITEMS,
        dim=DIM,
        negatives=SGNS_NEGATIVES,
        sharing=SGNS_SHARING,
        batch=SGNS_BATCH,
        rate=RATE,
        optimizer=optimizer,
        seed=7,
        noise_table=NOISE_TABLE,
        output_bias=output_bias,
        decay_rate=decay_rate,
    )
    total_steps = 4  # the rate decays linearly over them (SGD, and Adam with decay_rate)
    trainer.set_total_steps(total_steps)
    rng = np.random.default_rng(1)
    start_w = trainer.target.numpy()
    start_w[:, :DIM] = rng.normal(0, 0.5, (N_ITEMS + 1, DIM))  # a bias column stays at 1
    trainer.target.assign(start_w)
    trainer.context.assign(rng.normal(0, 0.5, trainer.context.shape).astype(np.float32))
    # The oracle's tables: Keras variables, moved by Keras's Adam (or by hand for SGD).
    table_w, table_c = keras.Variable(trainer.target.numpy()), keras.Variable(trainer.context.numpy())
    adam = keras.optimizers.Adam(learning_rate=RATE, beta_1=BETA1, beta_2=BETA2, epsilon=EPSILON)
    mean = optimizer == "adam"  # Adam steps on the batch mean, SGD on the sum (word2vec's)

    for step, (targets, contexts) in enumerate(SGNS_STEPS, start=1):
        # The gradients as the step computes them (its negatives are keyed by the step counter,
        # which the step itself advances: so set it, then put it back).
        pad = np.full(SGNS_BATCH - len(targets), N_ITEMS, np.int32)
        batch_targets, batch_contexts = np.concatenate([targets, pad]), np.concatenate([contexts, pad])
        trainer.step.assign(step)
        loss_sum, grad_w, context_rows, context_grads = (
            t.numpy() for t in trainer.batch_gradients(batch_targets, batch_contexts)
        )
        trainer.step.assign(step - 1)
        noise = context_rows[SGNS_BATCH:].reshape(-1, SGNS_NEGATIVES)  # (groups, K)
        pair_noise = noise[np.arange(len(targets)) // SGNS_SHARING]  # (P, K): each real pair's
        assert (pair_noise < N_ITEMS).all()

        # The oracle: the tape on the real pairs' loss, by TensorFlow's sigmoid cross-entropy.
        with tf.GradientTape() as tape:
            w = tf.gather(table_w, targets)
            c = tf.gather(table_c, contexts)
            positive = tf.reduce_sum(w * c, 1)
            negative = tf.einsum("pd,pkd->pk", w, tf.gather(table_c, pair_noise))
            per_pair = tf.nn.sigmoid_cross_entropy_with_logits(tf.ones_like(positive), positive)
            per_pair += tf.reduce_sum(
                tf.nn.sigmoid_cross_entropy_with_logits(tf.zeros_like(negative), negative), 1
            )
            loss = tf.reduce_mean(per_pair) if mean else tf.reduce_sum(per_pair)
        tape_w, tape_c = (dense(tf, g) for g in tape.gradient(loss, [table_w, table_c]))
        if output_bias:
            tape_w[:, -1] = 0.0  # the target side's constant-1 bias column does not train
        np.testing.assert_allclose(loss_sum, float(tf.reduce_sum(per_pair)), rtol=1e-5)
        hand_w = scattered(batch_targets, grad_w, tape_w.shape)
        hand_c = scattered(context_rows, context_grads, tape_c.shape)
        np.testing.assert_allclose(hand_w, tape_w, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(hand_c, tape_c, rtol=1e-5, atol=1e-7)

        # The step itself: the same negatives, so the tape's gradients, and the optimizer.
        mean_loss = trainer.train_epoch(targets, contexts)
        np.testing.assert_allclose(mean_loss, loss_sum / len(targets), rtol=1e-5)
        share = 1 - step / total_steps if decay_rate or optimizer == "sgd" else 1.0
        before_w, before_c = table_w.numpy(), table_c.numpy()
        if optimizer == "sgd":
            table_w.assign(before_w - RATE * share * tape_w)
            table_c.assign(before_c - RATE * share * tape_c)
        else:
            adam.learning_rate = RATE * share
            grads = [tf.constant(tape_w), tf.constant(tape_c)]
            adam.apply_gradients(zip(grads, [table_w, table_c], strict=True))
        if step == 1 and mean:
            # The moments (target m, v, context m, v) hold the summed gradients' magnitudes, which
            # a first Adam step's update (about rate x sign) does not show.
            moments = [*adam_moments(tape_w), *adam_moments(tape_c)]
            for moment, want, atol in zip(trainer.moments, moments, MOMENT_ATOL * 2, strict=True):
                np.testing.assert_allclose(moment.numpy(), want, rtol=1e-5, atol=atol)
        # Lazy: only the batch's rows move (Keras's dense Adam also moves rows with an earlier
        # gradient); the oracle's tables follow that rule. Exact for these two steps: a row left
        # out of step 2 (whose Keras moments then decayed, unlike lazy Adam's) is not used after.
        table_w.assign(lazily(before_w, table_w.numpy(), targets))
        table_c.assign(lazily(before_c, table_c.numpy(), np.concatenate([contexts, pair_noise.ravel()])))
        np.testing.assert_allclose(trainer.target.numpy(), table_w.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(trainer.context.numpy(), table_c.numpy(), rtol=1e-5, atol=1e-7)
    assert 3 in SGNS_STEPS[0][0] and 3 not in SGNS_STEPS[1][0]  # the lazy case the steps cover


# ---------------------------------------------------------------------------------------------
# Sampled softmax with the logQ correction (next_item2vec's default)
# ---------------------------------------------------------------------------------------------
def tf_sampled_softmax_loss(
    tf: Any,
    table_w: Any,
    table_c: Any,
    source: np.ndarray,
    target: np.ndarray,
    noise: np.ndarray,
    log_q: np.ndarray,
    bias_on: float,
) -> Any:
    """Per-pair losses by ``tf.nn.sampled_softmax_loss`` with these sampled candidates.

    TensorFlow's samplers draw distinct candidates, and its accidental-hit removal assumes them:
    with a candidate drawn twice it masks only one copy. So this oracle takes distinct ``noise``.
    """
    assert len(set(noise.tolist())) == len(noise)
    dim = table_w.shape[1]
    return tf.nn.sampled_softmax_loss(
        weights=table_c[:, :dim],
        biases=bias_on * table_c[:, dim],
        labels=tf.constant(target[:, None], tf.int64),
        inputs=tf.gather(table_w, source),
        num_sampled=len(noise),
        num_classes=table_c.shape[0],
        sampled_values=(
            tf.constant(noise, tf.int64),
            tf.constant(np.exp(log_q[target])[:, None], table_w.dtype),
            tf.constant(np.exp(log_q[noise]), table_w.dtype),
        ),
        remove_accidental_hits=True,
    )


def written_softmax_loss(
    tf: Any,
    table_w: Any,
    table_c: Any,
    source: np.ndarray,
    target: np.ndarray,
    noise: np.ndarray,
    log_q: np.ndarray,
    bias_on: float,
) -> Any:
    """Per-pair losses of the same sampled softmax, written out on the tables.

    Candidates [target, noise...] per pair; logits ``w . c + bias_on * bias - log q``; every
    negative equal to the pair's target masked (the trainers draw with replacement, so a
    negative can repeat); softmax cross-entropy by ``tf.nn.softmax_cross_entropy_with_logits``.
    """
    dim = table_w.shape[1]
    pairs = len(target)
    candidates = np.concatenate([target[:, None], np.broadcast_to(noise, (pairs, len(noise)))], 1)
    rows = tf.gather(table_c, candidates)  # (P, 1 + K, d + 1)
    logits = (
        tf.einsum("pd,pkd->pk", tf.gather(table_w, source), rows[..., :dim])
        + bias_on * rows[..., dim]
        - tf.constant(log_q[candidates], table_w.dtype)
    )
    hit = np.concatenate([np.zeros((pairs, 1), bool), noise[None, :] == target[:, None]], 1)
    logits = tf.where(hit, tf.constant(-1e30, table_w.dtype), logits)
    labels = tf.one_hot(np.zeros(pairs, np.int32), 1 + len(noise), dtype=table_w.dtype)
    return tf.nn.softmax_cross_entropy_with_logits(labels, logits)


@pytest.mark.parametrize("bias_on", [1.0, 0.0])
@pytest.mark.parametrize(
    "noise",
    [
        np.array([3, 4, 1, 2], np.int32),  # distinct: hits 3 (pairs 1, 2) and 1 (pair 0)
        np.array([3, 4, 1, 3], np.int32),  # 3 drawn twice: both copies are pair 1's and 2's hits
    ],
    ids=["distinct", "repeated"],
)
def test_sampled_softmax_gradients_match_gradient_tape(tf: Any, noise: np.ndarray, bias_on: float) -> None:
    rng = np.random.default_rng(2)
    rows = N_ITEMS + 1  # the last row is the padding row
    table_w0 = rng.normal(0, 0.7, (rows, DIM))
    table_c0 = rng.normal(0, 0.7, (rows, DIM + 1))
    log_q = np.log(rng.dirichlet(np.ones(rows)))
    # Repeated sources and targets, and a padding pair; float64, so the tolerances are tight.
    source = np.array([0, 2, 2, 5, N_ITEMS], np.int32)
    target = np.array([1, 3, 3, 0, N_ITEMS], np.int32)
    valid = (source < N_ITEMS).astype(np.float64)

    loss_sum, grad_w, grad_c_all = sampled_softmax_gradients(
        tf,
        tf.gather(table_w0, source),
        tf.gather(table_c0, np.concatenate([target, noise])),
        tf.constant(target),
        tf.constant(noise),
        tf.constant(log_q),
        tf.constant(valid),
        bias_on,
    )
    if bias_on == 0.0:
        assert not grad_c_all.numpy()[:, DIM].any()  # the bias column does not train
    hand_w = scattered(source, grad_w.numpy(), table_w0.shape)
    hand_c = scattered(np.concatenate([target, noise]), grad_c_all.numpy(), table_c0.shape)

    real = valid > 0
    oracles = [written_softmax_loss]
    if len(set(noise.tolist())) == len(noise):
        oracles.append(tf_sampled_softmax_loss)
    for oracle in oracles:
        table_w, table_c = tf.Variable(table_w0), tf.Variable(table_c0)
        with tf.GradientTape() as tape:
            per_pair = oracle(tf, table_w, table_c, source[real], target[real], noise, log_q, bias_on)
            loss = tf.reduce_mean(per_pair)  # the trainer's loss: the mean over real pairs
        tape_w, tape_c = (dense(tf, g) for g in tape.gradient(loss, [table_w, table_c]))
        np.testing.assert_allclose(loss_sum.numpy(), tf.reduce_sum(per_pair).numpy(), rtol=1e-12)
        np.testing.assert_allclose(hand_w, tape_w, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(hand_c, tape_c, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("output_bias", [True, False])
def test_sampled_softmax_training_steps_match_keras_adam(tf: Any, output_bias: bool) -> None:
    import keras

    batch, negatives, seed = 5, 4, 11
    log_q = np.log(np.bincount(NOISE_TABLE, minlength=N_ITEMS) / len(NOISE_TABLE))
    trainer = SampledSoftmaxTrainer(
        tf,
        n_items=N_ITEMS,
        dim=DIM,
        negatives=negatives,
        batch=batch,
        rate=RATE,
        seed=seed,
        noise_table=NOISE_TABLE,
        log_q=log_q,
        output_bias=output_bias,
        decay_rate=False,
        pairs_per_epoch=batch,
        epochs=2,
        replicas=1,
    )
    try:
        rng = np.random.default_rng(3)
        state_w, state_c = trainer.states[0]
        rows = N_ITEMS + 1
        start_w = np.zeros(state_w.shape, np.float32)  # [param | m | v], moments at zero
        start_w[:, :DIM] = rng.normal(0, 0.7, (rows, DIM))
        start_c = np.zeros(state_c.shape, np.float32)
        start_c[:, : DIM + 1] = rng.normal(0, 0.7, (rows, DIM + 1))
        state_w.assign(start_w)
        state_c.assign(start_c)
        # Two one-step epochs; source 4 only in the first (so lazy Adam leaves it in the second).
        steps = [
            (np.array([0, 2, 2, 4, 1], np.int32), np.array([1, 3, 5, 0, 2], np.int32)),
            (np.array([3, 0, 5, 5, 1], np.int32), np.array([4, 1, 0, 2, 3], np.int32)),
        ]
        # Replica 0's draw of a step's negatives, compiled as training compiles it.
        draw = tf.function(
            lambda step: draw_negatives(
                tf, tf.constant(seed, tf.int64), tf.constant(0, tf.int64), step, negatives, len(NOISE_TABLE)
            ),
            jit_compile=True,
        )
        bias_on = 1.0 if output_bias else 0.0
        table_w = keras.Variable(start_w[:, :DIM])
        table_c = keras.Variable(start_c[:, : DIM + 1])
        adam = keras.optimizers.Adam(learning_rate=RATE, beta_1=BETA1, beta_2=BETA2, epsilon=EPSILON)
        for step, (source, target) in enumerate(steps, start=1):
            noise = NOISE_TABLE[draw(tf.constant(step, tf.int64)).numpy()]
            before_w, before_c = table_w.numpy(), table_c.numpy()
            with tf.GradientTape() as tape:
                per_pair = written_softmax_loss(
                    tf, table_w, table_c, source, target, noise, np.append(log_q, 0.0), bias_on
                )
                loss = tf.reduce_mean(per_pair)
            grads = [dense(tf, g) for g in tape.gradient(loss, [table_w, table_c])]
            adam.apply_gradients(zip([tf.constant(g) for g in grads], [table_w, table_c], strict=True))
            # Lazy Adam: only the rows of the batch move (as in the skip-gram test above).
            table_w.assign(lazily(before_w, table_w.numpy(), source))
            table_c.assign(lazily(before_c, table_c.numpy(), np.concatenate([target, noise])))

            mean_loss = trainer.train_epoch(source, target)
            np.testing.assert_allclose(mean_loss, float(loss), rtol=1e-5)
            got_w, got_c = (v.numpy() for v in trainer.states[0])
            np.testing.assert_allclose(got_w[:, :DIM], table_w.numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got_c[:, : DIM + 1], table_c.numpy(), rtol=1e-5, atol=1e-7)
            if step == 1:  # the moments, which show the summed gradients' magnitudes
                for got, gradient, width in ((got_w, grads[0], DIM), (got_c, grads[1], DIM + 1)):
                    first, second = adam_moments(gradient)
                    moments = got[:, width : 2 * width], got[:, 2 * width :]
                    np.testing.assert_allclose(moments[0], first, rtol=1e-5, atol=MOMENT_ATOL[0])
                    np.testing.assert_allclose(moments[1], second, rtol=1e-5, atol=MOMENT_ATOL[1])
        assert 4 in steps[0][0] and 4 not in steps[1][0]  # the lazy case the steps cover
    finally:
        trainer.close()
