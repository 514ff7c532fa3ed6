"""Losses as (sum, weight) pairs, so that gradient accumulation and multi-host means are exact:
the mean is taken once, over the whole global batch, by whoever adds the pairs up."""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from flaxbert.heads import PretrainingOutput

Array = jax.Array


class LossTerm(NamedTuple):
    loss_sum: Array  # scalar float32: sum of per-example losses times weights
    weight: Array  # scalar float32: sum of weights (what the sum is divided by)
    correct: Array  # scalar float32: weighted count of correct argmax predictions (0 for regression)

    @property
    def mean(self) -> Array:
        return self.loss_sum / jnp.maximum(self.weight, 1e-9)


def cross_entropy(logits: Array, labels: Array, weights: Array | None = None) -> LossTerm:
    """Softmax cross-entropy over the last axis of `logits`; `weights` 0 excludes a position."""
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    weights = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    max_logit = jnp.max(logits, axis=-1)
    log_z = max_logit + jnp.log(jnp.sum(jnp.exp(logits - max_logit[..., None]), axis=-1))
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    nll = log_z - label_logit
    # "The label's logit is the largest" reuses the max of the softmax; a separate argmax over the
    # vocabulary cost ~12% of a tiny-model step on CPU. (Exact ties count as correct.)
    correct = (label_logit >= max_logit).astype(jnp.float32)
    return LossTerm(jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights))


def mean_squared_error(predictions: Array, targets: Array, weights: Array | None = None) -> LossTerm:
    """Regression loss (sequence classification with num_labels == 1)."""
    predictions = predictions.astype(jnp.float32).reshape(targets.shape)
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    se = jnp.square(predictions - targets.astype(jnp.float32))
    return LossTerm(jnp.sum(se * weights), jnp.sum(weights), jnp.zeros((), jnp.float32))


def mlm_loss(output, batch: Mapping[str, Array]) -> LossTerm:
    return cross_entropy(output.mlm_logits, batch["masked_lm_ids"], batch["masked_lm_weights"])


def nsp_loss(output: PretrainingOutput, batch: Mapping[str, Array]) -> LossTerm:
    labels = batch["next_sentence_labels"]
    weights = batch.get("next_sentence_weights")  # packed rows: [batch, instances]
    return cross_entropy(output.nsp_logits, labels.reshape(output.nsp_logits.shape[:-1]), weights)


def pretraining_losses(output: PretrainingOutput, batch: Mapping[str, Array]) -> dict[str, LossTerm]:
    """{"mlm": ..., "nsp": ...}; the total loss is mlm.mean + nsp.mean over the global batch."""
    return {"mlm": mlm_loss(output, batch), "nsp": nsp_loss(output, batch)}


def span_loss(start_logits: Array, end_logits: Array, start_positions: Array, end_positions: Array,
              weights: Array | None = None) -> LossTerm:
    """Extractive QA: the mean of the start and end cross-entropies (as BERT's SQuAD head)."""
    start = cross_entropy(start_logits, start_positions, weights)
    end = cross_entropy(end_logits, end_positions, weights)
    return LossTerm((start.loss_sum + end.loss_sum) / 2, start.weight, (start.correct + end.correct) / 2)
