"""Synthetic pretraining batches that follow docs/CONTRACTS.md, and a tiny model, for the train tests."""

from __future__ import annotations

import numpy as np

from flaxbert.config import BertConfig


def tiny_config(**kw) -> BertConfig:
    fields = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fields.update(kw)
    return BertConfig(**fields)


def synthetic_batch(rng: np.random.Generator, batch: int, seq: int = 16, predictions: int = 4, vocab: int = 96):
    """Random but contract-shaped: padded tails, variable numbers of real masked positions."""
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int32) * mask
    types = ((np.arange(seq)[None, :] >= (lengths // 2)[:, None]) * mask).astype(np.int32)
    positions = np.stack([np.sort(rng.choice(np.arange(1, l), size=predictions, replace=False)) for l in lengths])
    n_real = rng.integers(1, predictions + 1, size=batch)
    weights = (np.arange(predictions)[None, :] < n_real[:, None]).astype(np.float32)
    return {
        "input_ids": ids, "token_type_ids": types, "attention_mask": mask,
        "masked_lm_positions": (positions * weights).astype(np.int32),
        "masked_lm_ids": (rng.integers(5, vocab, size=(batch, predictions)) * weights).astype(np.int32),
        "masked_lm_weights": weights,
        "next_sentence_labels": rng.integers(0, 2, size=batch).astype(np.int32),
    }
