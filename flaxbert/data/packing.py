"""Sequence packing: several NSP instances per row, with per-instance ids, positions, MLM and NSP targets.

grain's `FirstFitPackIterDataset` packs the variable-length instance features; `packed_batch` turns its
segment ids / positions into the packed batch contract of docs/CONTRACTS.md: `instance_ids` (1..k, 0 = pad),
`position_ids` restarting at 0 for every instance, `cls_positions` and per-instance NSP labels/weights, and
masked-LM positions shifted from instance to row coordinates. The model must keep attention inside an instance.
"""

from __future__ import annotations

import numpy as np

PACKED_FEATURES = ("input_ids", "token_type_ids", "masked_lm_positions", "masked_lm_ids", "next_sentence_labels")


def pack(dataset, *, seq_len: int, max_predictions: int, max_instances: int, num_bins: int, seed: int):
    """First-fit pack an IterDataset of `instance_features` dicts into rows of `seq_len` tokens.

    A row holds at most `max_instances` instances and `max_predictions` masked positions in total.
    """
    from grain.experimental import FirstFitPackIterDataset

    lengths = {"input_ids": seq_len, "token_type_ids": seq_len, "masked_lm_positions": max_predictions,
               "masked_lm_ids": max_predictions, "next_sentence_labels": max_instances}
    return FirstFitPackIterDataset(dataset, length_struct=lengths, num_packing_bins=num_bins, seed=seed,
                                   shuffle_bins=True, max_sequences_per_bin=max_instances)


def packed_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of grain-packed rows -> the packed batch contract (all [B, S], [B, P] or [B, K])."""
    instance_ids = batch["input_ids_segment_ids"].astype(np.int32)  # [B, S]
    num_instances = batch["next_sentence_labels"].shape[1]
    # [B, K]: row index of each instance's first token ([CLS]); 0 for empty slots (weight 0)
    cls_positions = np.stack([np.argmax(instance_ids == k, axis=1) for k in range(1, num_instances + 1)], axis=1)
    mlm_instance = batch["masked_lm_positions_segment_ids"]  # [B, P], 0 = padding slot
    offsets = np.take_along_axis(cls_positions, np.maximum(mlm_instance - 1, 0), axis=1)
    mlm_valid = mlm_instance > 0
    nsp_valid = batch["next_sentence_labels_segment_ids"] > 0
    return {
        "input_ids": batch["input_ids"].astype(np.int32),
        "token_type_ids": batch["token_type_ids"].astype(np.int32),
        "attention_mask": (instance_ids > 0).astype(np.int32),
        "instance_ids": instance_ids,
        "position_ids": batch["input_ids_positions"].astype(np.int32),
        "masked_lm_positions": np.where(mlm_valid, batch["masked_lm_positions"] + offsets, 0).astype(np.int32),
        "masked_lm_ids": np.where(mlm_valid, batch["masked_lm_ids"], 0).astype(np.int32),
        "masked_lm_weights": mlm_valid.astype(np.float32),
        "next_sentence_labels": np.where(nsp_valid, batch["next_sentence_labels"], 0).astype(np.int32),
        "next_sentence_weights": nsp_valid.astype(np.float32),
        "cls_positions": np.where(nsp_valid, cls_positions, 0).astype(np.int32),
    }
