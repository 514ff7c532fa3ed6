"""Dynamic padding into a few length buckets, so that only a few shapes compile and short sentences
are not padded to the model's maximum.

Every batch has exactly `batch_size` rows (a short last batch is filled with dummy rows of weight 0)
and a length from `boundaries`, so a run compiles at most `len(boundaries)` shapes per step function.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

SEQ_KEYS = ("input_ids", "token_type_ids", "attention_mask", "token_labels")
PAD_VALUES = {"token_labels": -100}  # everything else pads with 0
# per-feature keys that never enter the model (kept on the host for post-processing)
HOST_KEYS = ("offsets", "word_ids", "example_index")


def bucket_boundaries(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `max_length` (always included): 16, 32, 64, 128, ..."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)


def length_of(feature: dict) -> int:
    return int(feature["input_ids"].shape[-1])


def bucket_of(length: int, boundaries: Sequence[int]) -> int:
    for i, b in enumerate(boundaries):
        if length <= b:
            return i
    raise ValueError(f"a feature of {length} tokens is longer than the largest bucket {boundaries[-1]}")


def pad_batch(features: Sequence[dict], indices: Sequence[int], batch_size: int, length: int) -> dict:
    """Stack `features[indices]` into one batch of `batch_size` rows padded to `length` tokens.

    Adds `attention_mask` (1 = real token), `weight` [B] (0 for filler rows) and `index` [B] (the
    feature index, -1 for filler rows). Host-only keys are left out.
    """
    first = features[indices[0]]
    keys = [k for k in first if k not in HOST_KEYS]
    if "attention_mask" not in first:
        keys.append("attention_mask")
    batch = {}
    for k in keys:
        if k in SEQ_KEYS:
            lead = first["input_ids"].shape[:-1]  # () or (choices,)
            arr = np.full((batch_size,) + lead + (length,), PAD_VALUES.get(k, 0), np.int32)
            for row, i in enumerate(indices):
                src = features[i].get(k)
                if src is None:  # attention_mask derived from the unpadded input_ids
                    src = np.ones_like(features[i]["input_ids"])
                arr[row, ..., : src.shape[-1]] = src
        else:
            value = np.asarray(first[k])
            arr = np.zeros((batch_size,) + value.shape, value.dtype)
            for row, i in enumerate(indices):
                arr[row] = features[i][k]
        batch[k] = arr
    batch["weight"] = np.zeros(batch_size, np.float32)
    batch["weight"][: len(indices)] = 1.0
    batch["index"] = np.full(batch_size, -1, np.int32)
    batch["index"][: len(indices)] = indices
    return batch


def make_batches(features: Sequence[dict], batch_size: int, boundaries: Sequence[int], *, shuffle: bool = False,
                 seed: int = 0, drop_remainder: bool = False) -> Iterator[dict]:
    """Batches of features of similar length. Without `shuffle`, features are batched in order of
    length (deterministic, for evaluation); with it, each epoch's seed shuffles within buckets and
    then the order of the batches. Batch length = the bucket boundary of its longest feature."""
    rng = np.random.default_rng(seed)
    groups: dict[int, list[int]] = {}
    for i, f in enumerate(features):
        groups.setdefault(bucket_of(length_of(f), boundaries), []).append(i)
    chunks = []
    for b, members in sorted(groups.items()):
        members = np.asarray(members)
        if shuffle:
            members = rng.permutation(members)
        for start in range(0, len(members), batch_size):
            chunk = members[start: start + batch_size]
            if drop_remainder and len(chunk) < batch_size:
                continue
            chunks.append((boundaries[b], chunk))
    if shuffle:
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    for length, chunk in chunks:
        yield pad_batch(features, chunk.tolist(), batch_size, length)


def num_batches(features: Sequence[dict], batch_size: int, boundaries: Sequence[int],
                drop_remainder: bool = False) -> int:
    counts = np.bincount([bucket_of(length_of(f), boundaries) for f in features], minlength=len(boundaries))
    if drop_remainder:
        return int(np.sum(counts // batch_size))
    return int(np.sum(-(-counts // batch_size)))


def real_tokens(batch: dict) -> int:
    """Non-pad tokens in a batch (filler rows have none)."""
    return int(np.sum(batch["attention_mask"]))


def fixed_length_boundaries(max_length: int) -> tuple[int, ...]:
    """The wasteful baseline: every sequence padded to `max_length` (HF's Flax GLUE example)."""
    return (max_length,)


def gather_rows(values: np.ndarray, batch: dict, out: Optional[list] = None) -> list:
    """Per-feature rows of a model output for the real (non-filler) rows of `batch`, as (index, row)."""
    out = [] if out is None else out
    for row, idx in enumerate(batch["index"]):
        if idx >= 0:
            out.append((int(idx), values[row]))
    return out
