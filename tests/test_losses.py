"""Losses against optax's reference cross-entropy and plain numpy, including the (sum, weight) contract."""

import jax.numpy as jnp
import numpy as np
import optax

from flaxbert.losses import cross_entropy, mean_squared_error, span_loss


def _case(seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(4, 7, 50)) * 5).astype(np.float32)
    labels = rng.integers(0, 50, (4, 7))
    labels[:, :3] = logits[:, :3].argmax(-1)  # some predictions are right
    weights = rng.integers(0, 2, (4, 7)).astype(np.float32)
    return logits, labels, weights


def test_cross_entropy_matches_optax_and_argmax_accuracy():
    logits, labels, weights = _case()
    term = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(float(term.loss_sum), float((ref * weights).sum()), rtol=1e-6)
    assert float(term.weight) == weights.sum()
    expected_correct = ((logits.argmax(-1) == labels) * weights).sum()
    assert expected_correct > 0
    assert float(term.correct) == expected_correct


def test_sums_add_up_across_splits():
    logits, labels, weights = _case(1)
    whole = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
    parts = [cross_entropy(jnp.asarray(logits[i:i + 2]), jnp.asarray(labels[i:i + 2]), jnp.asarray(weights[i:i + 2]))
             for i in (0, 2)]
    np.testing.assert_allclose(float(whole.mean), float(sum(p.loss_sum for p in parts) / sum(p.weight for p in parts)),
                               rtol=1e-6)


def test_mse_and_span_loss():
    preds, targets = np.array([1.0, 2.0, 4.0], np.float32), np.array([1.5, 2.0, 3.0], np.float32)
    term = mean_squared_error(jnp.asarray(preds[:, None]), jnp.asarray(targets))
    assert float(term.loss_sum) == ((preds - targets) ** 2).sum() and float(term.weight) == 3
    logits, labels, _ = _case(2)
    start, end = logits[:, 0], logits[:, 1]
    term = span_loss(jnp.asarray(start), jnp.asarray(end), jnp.asarray(labels[:, 0]), jnp.asarray(labels[:, 1]))
    ref = (optax.softmax_cross_entropy_with_integer_labels(start, labels[:, 0])
           + optax.softmax_cross_entropy_with_integer_labels(end, labels[:, 1])).sum() / 2
    np.testing.assert_allclose(float(term.loss_sum), float(ref), rtol=1e-6)
